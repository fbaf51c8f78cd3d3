"""Checkpoints shipped already quantized (models/quantized_checkpoint.py): tiny Llama
checkpoints written on the fly with safetensors in the compressed-tensors and Model
Optimizer formats load through the engine into the fused quantized projections, compute
what their dequantized weights do, and formats we do not read get errors that name them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from models.errors import ModelError
from worker.embedded.engine import EmbeddedEngine
from worker.embedded.quant import FP8, QuantLinear, quantize_rows
from worker.embedded.smoothquant import forward_prompt
from worker.engine_api import EngineConfig, EngineConfigError, KvCacheConfig

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 64, 96, 2, 4, 2, 16, 128
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTER,
    "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": False,
    "eos_token_id": 1, "bos_token_id": 0,
}
PROJ = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def dense_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (HEADS * HEAD_DIM, HIDDEN), "k_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
              "o_proj": (HIDDEN, HEADS * HEAD_DIM), "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}
    t = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g), "model.norm.weight": torch.ones(HIDDEN),
         "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=g) * 0.1}
    for i in range(LAYERS):
        t[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(HIDDEN)
        t[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(HIDDEN)
        for block, names in PROJ.items():
            for n in names:
                t[f"model.layers.{i}.{block}.{n}.weight"] = torch.randn(*shapes[n], generator=g) * 0.1
    return t


def write_checkpoint(path, dtype: torch.dtype | None, strategy: str = "channel", quantization_config: dict | None = None,
                     input_scale: bool = False, scale_dtype=torch.float32, extra: dict | None = None):
    """A checkpoint of dense_weights(), its projections quantized to `dtype` (None: not
    at all). Returns the dense weights the 8-bit ones stand for (q * scale)."""
    path.mkdir(parents=True, exist_ok=True)
    tensors, dequantized = {}, {}
    for name, w in dense_weights().items():
        if dtype is None or not any(f".{p}." in name for ps in PROJ.values() for p in ps):
            tensors[name] = dequantized[name] = w.to(torch.bfloat16)
            continue
        if strategy == "channel":
            q, s = quantize_rows(w, dtype)
            scale = s[:, None]
        else:
            scale = (w.abs().max() / (127.0 if dtype == torch.int8 else 448.0)).reshape(1)
            q = (w / scale).round().clamp(-127, 127).to(dtype) if dtype == torch.int8 else (w / scale).to(dtype)
        tensors[name] = q
        tensors[name.replace(".weight", ".weight_scale")] = scale.to(scale_dtype)
        if input_scale:
            tensors[name.replace(".weight", ".input_scale")] = torch.tensor([0.05])
        dequantized[name] = q.float() * scale.to(scale_dtype).float()
    tensors.update(extra or {})
    save_file(tensors, str(path / "model.safetensors"))
    config = dict(CONFIG)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config))
    return dequantized


def compressed_tensors_config(wtype: str, strategy: str, activations: str | None, fmt: str | None = None, **weights) -> dict:
    group = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": wtype, "strategy": strategy, "symmetric": True,
                                                "dynamic": False, **weights},
             "input_activations": None if activations is None else
             {"num_bits": 8, "type": activations, "strategy": "token", "symmetric": True, "dynamic": True}}
    return {"quant_method": "compressed-tensors", "format": fmt or ("float-quantized" if wtype == "float" else "int-quantized"),
            "config_groups": {"group_0": group}, "ignore": ["lm_head"], "quantization_status": "compressed"}


def load(path, **kw) -> EmbeddedEngine:
    return EmbeddedEngine(EngineConfig(model=str(path), device="cpu", kv_cache=KvCacheConfig(cpu_bytes=2 * 2**20), **kw))


def dense_engine(tmp_path, dequantized: dict, quantization: str = "none", **kw) -> EmbeddedEngine:
    """An engine of the same model from a float32 checkpoint of the dequantized weights."""
    d = tmp_path / "dense"
    d.mkdir()
    save_file({k: v.float().contiguous() for k, v in dequantized.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(CONFIG))
    return load(d, quantization=quantization, **kw)


IDS = list(range(2, 40))

CASES = {  # name: (weight dtype, strategy, quantization_config or hf_quant_config.json content, scheme)
    "ct-fp8-channel": (FP8, "channel", compressed_tensors_config("float", "channel", "float"), "fp8"),
    "ct-fp8-tensor": (FP8, "tensor", compressed_tensors_config("float", "tensor", "float"), "fp8"),
    "ct-int8-w8a16-channel": (torch.int8, "channel", compressed_tensors_config("int", "channel", None), "int8-weight-only"),
    "ct-int8-w8a16-tensor-naive": (torch.int8, "tensor", compressed_tensors_config("int", "tensor", None, "naive-quantized"), "int8-weight-only"),
    "ct-int8-w8a8": (torch.int8, "channel", compressed_tensors_config("int", "channel", "int"), "int8-smoothquant"),
    "modelopt-fp8": (FP8, "tensor", {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": None,
                                     "exclude_modules": ["lm_head"]}, "fp8"),
    "modelopt-fp8-per-channel": (FP8, "channel", {"quant_method": "modelopt", "quant_algo": "FP8_PER_CHANNEL_PER_TOKEN",
                                                  "exclude_modules": ["lm_head"]}, "fp8"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_checkpoint_loads_fused_and_computes_its_weights(tmp_path, case):
    dtype, strategy, qc, scheme = CASES[case]
    dequantized = write_checkpoint(tmp_path / "q", dtype, strategy, qc, input_scale=case.startswith("modelopt"),
                                   scale_dtype=torch.bfloat16 if case == "ct-fp8-channel" else torch.float32)
    engine = load(tmp_path / "q")
    assert engine.quantization == scheme
    qkv = engine.model.layers[1].self_attn.qkv_proj
    assert isinstance(qkv, QuantLinear) and qkv.weight.dtype == dtype
    # q, k and v stacked, each row with its own scale (a tensor's scale spread over its rows).
    w = qkv.weight.float() * qkv.weight_scale[:, None]
    expect = torch.cat([dequantized[f"model.layers.1.self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")])
    torch.testing.assert_close(w, expect.float(), rtol=1e-6, atol=1e-7)
    down = engine.model.layers[0].mlp.down_proj
    torch.testing.assert_close(down.weight.float() * down.weight_scale[:, None],
                               dequantized["model.layers.0.mlp.down_proj.weight"].float(), rtol=1e-6, atol=1e-7)
    # The same function as the dequantized weights, up to the per-token activation rounding.
    with torch.no_grad():
        ours = forward_prompt(engine.model, IDS, every_position=True)
        dense = forward_prompt(dense_engine(tmp_path, dequantized).model, IDS, every_position=True)
    rel = ((ours - dense).norm() / dense.norm()).item()
    assert rel < (1e-5 if scheme == "int8-weight-only" else 0.1), rel


def test_hf_quant_config_json_of_model_optimizer(tmp_path):
    write_checkpoint(tmp_path, FP8, "tensor", None, input_scale=True,
                     extra={"model.layers.0.self_attn.k_proj.k_scale": torch.tensor(1.0),
                            "model.layers.0.self_attn.v_proj.v_scale": torch.tensor(1.0)})
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt", "version": "0.19.0"},
         "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}}))
    assert load(tmp_path).quantization == "fp8"


@pytest.mark.parametrize("every_layer", [True, False])
def test_a_checkpoints_kv_cache_scales_serve_an_fp8_cache(tmp_path, every_layer):
    """compressed-tensors' kv_cache_scheme: its per-layer k_scale and v_scale become the FP8
    cache's scales; a checkpoint that ships them for some layers only is calibrated here.
    Without --kv-cache-dtype fp8 they are read past."""
    qc = {**compressed_tensors_config("float", "channel", "float"),
          "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}}
    scales = {f"model.layers.{i}.self_attn.{kind}_scale": torch.tensor(0.25 + i / 8 + (kind == "v") / 16)
              for i in range(LAYERS if every_layer else 1) for kind in "kv"}
    write_checkpoint(tmp_path, FP8, "channel", qc, extra=scales)
    assert load(tmp_path).kv_dtype == torch.float32
    engine = EmbeddedEngine(EngineConfig(model=str(tmp_path), device="cpu",
                                         kv_cache=KvCacheConfig(cpu_bytes=2 * 2**20, dtype="fp8")))
    assert engine.kv_dtype == FP8
    got = [(layer.self_attn.k_scale, layer.self_attn.v_scale) for layer in engine.model.layers]
    want = [(0.25 + i / 8, 0.25 + i / 8 + 1 / 16) for i in range(LAYERS)]
    if every_layer:
        assert got == want
    else:  # calibrated: the model's own magnitudes, not the one layer's shipped values
        assert all(k > 0 and v > 0 for k, v in got) and got[0] != want[0]


@pytest.mark.parametrize("qc,message", [
    ({"quant_method": "awq", "bits": 4}, "quant_method 'awq' is not supported"),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, "quant_algo 'NVFP4' is not supported"),
    ({"quant_method": "modelopt", "quantization": {"quant_algo": "W4A16_AWQ"}}, "quant_algo 'W4A16_AWQ'"),
    ({**compressed_tensors_config("int", "group", None, group_size=128)}, "weights int 8-bit group is not supported"),
    ({**compressed_tensors_config("int", "channel", None, num_bits=4)}, "weights int 4-bit channel is not supported"),
    ({**compressed_tensors_config("int", "channel", None, symmetric=False)}, "asymmetric is not supported"),
    ({**compressed_tensors_config("int", "channel", None), "format": "pack-quantized"}, "format 'pack-quantized' is not supported"),
    ({**compressed_tensors_config("float", "channel", None)}, "FP8 weight-only"),
    ({**compressed_tensors_config("float", "channel", "float"), "ignore": ["re:.*down_proj"]}, "only lm_head"),
])
def test_unsupported_formats_are_named(tmp_path, qc, message):
    write_checkpoint(tmp_path, None, quantization_config=qc)
    with pytest.raises(ModelError, match=message):
        load(tmp_path)


def test_quantization_flag_must_match_a_quantized_checkpoint(tmp_path):
    write_checkpoint(tmp_path, FP8, "channel", compressed_tensors_config("float", "channel", "float"))
    with pytest.raises(EngineConfigError, match=r"--quantization int8-weight-only: the checkpoint is already quantized "
                                                r"\(compressed-tensors, fp8\)"):
        load(tmp_path, quantization="int8-weight-only")
    assert load(tmp_path, quantization="fp8").quantization == "fp8"


def test_weight_dtype_must_match_the_config(tmp_path):
    write_checkpoint(tmp_path, torch.int8, "channel", compressed_tensors_config("float", "channel", "float"))
    with pytest.raises(ModelError, match="its quantization_config says"):
        load(tmp_path)


def test_quantizing_a_dense_checkpoint_at_load_matches_our_own_scales(tmp_path):
    """--quantization on a 16-bit checkpoint gives the weights a compressed-tensors
    channel-strategy checkpoint of the same model holds (with amax scales: the default,
    searched scales, differ by design)."""
    dequantized = write_checkpoint(tmp_path / "q", FP8, "channel", compressed_tensors_config("float", "channel", "float"))
    shipped = load(tmp_path / "q").model.layers[0].mlp.gate_up_proj
    ours = dense_engine(tmp_path, dense_weights(), quantization="fp8", fp8_weight_scales="amax").model.layers[0].mlp.gate_up_proj
    torch.testing.assert_close(ours.weight_scale, shipped.weight_scale, rtol=1e-6, atol=0)
    assert torch.equal(ours.weight.float(), shipped.weight.float())
    del dequantized


def test_qwen2_biases_stay_16_bit_beside_int8_weights(tmp_path):
    bias = {f"model.layers.{i}.self_attn.{n}.bias": torch.randn(size) for i in range(LAYERS)
            for n, size in (("q_proj", HEADS * HEAD_DIM), ("k_proj", KV_HEADS * HEAD_DIM), ("v_proj", KV_HEADS * HEAD_DIM))}
    dequantized = write_checkpoint(tmp_path / "q", torch.int8, "channel", compressed_tensors_config("int", "channel", None),
                                   extra=bias)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    (tmp_path / "q" / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForCausalLM"]}))
    qkv = load(tmp_path / "q").model.layers[1].self_attn.qkv_proj
    want = torch.cat([bias[f"model.layers.1.self_attn.{n}.bias"] for n in ("q_proj", "k_proj", "v_proj")])
    assert qkv.bias.dtype == torch.float32 and torch.equal(qkv.bias, want)
    del dequantized


def test_fp8_needs_compute_capability_8_9(monkeypatch):
    from worker.embedded.quant import SCHEMES, check_device

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(EngineConfigError, match="--quantization fp8 needs a GPU of compute capability 8.9 or later; "
                                                "NVIDIA A100-SXM4-80GB is 8.0"):
        check_device(SCHEMES["fp8"], torch.device("cuda"))
    check_device(SCHEMES["int8-smoothquant"], torch.device("cuda"))


def test_a_quantized_lm_head_is_named(tmp_path):
    q, s = quantize_rows(dense_weights()["lm_head.weight"], FP8)
    qc = {**compressed_tensors_config("float", "channel", "float"), "ignore": []}
    write_checkpoint(tmp_path, FP8, "channel", qc, extra={"lm_head.weight": q, "lm_head.weight_scale": s[:, None]})
    with pytest.raises(ModelError, match=r"lm_head.weight(_scale)?: only the layers' q_proj, k_proj, v_proj, o_proj, "
                                         r"gate_proj, up_proj, down_proj may be quantized"):
        load(tmp_path)
