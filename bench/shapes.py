"""Real model shapes for benchmarks with random weights (no download needed): as our
ModelConfig, as a model directory `inflight serve` can load, and as transformers' Llama."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

SHAPES = {
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    ),
    "llama-3.2-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
        rope_scaling=LLAMA3_ROPE,
    ),
    "llama-3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    ),
}


def model_config(name: str):
    from models.config import ModelConfig

    return ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], **SHAPES[name]}, name=name)


def hf_llama(name: str, device: str = "cuda", dtype=None):
    """transformers' Llama of the shape, random weights (from torch's global generator), in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[name]))
    return (model.to(dtype) if dtype else model).eval()


def make_model_dir(shape: str, tokenizer: Path, vocab_size: int | None = None) -> Path:
    """A model directory of the shape with random bf16 weights (seeded) and the tokenizer
    (a folder holding tokenizer.json and tokenizer_config.json whose vocabulary fits the
    shape, or `vocab_size` in its place), in a fresh temporary folder; the caller removes
    its parent."""
    import torch
    from safetensors.torch import save_file

    cfg = {"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16", **SHAPES[shape]}
    if vocab_size:
        cfg["vocab_size"] = vocab_size
    d = Path(tempfile.mkdtemp(prefix="inflight-bench-")) / shape
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, d / name)
    g = torch.Generator().manual_seed(0)
    h, i, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"] * cfg["head_dim"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    t = {"model.embed_tokens.weight": rnd(cfg["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        t |= {p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
              p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
              p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h), p + "mlp.down_proj.weight": rnd(h, i),
              p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
              p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = rnd(cfg["vocab_size"], h)
    save_file(t, str(d / "model.safetensors"))
    return d


def random_weights(cfg, seed: int = 0):
    """Hugging Face-named random tensors whose outputs depend on the whole context: each
    projection scaled by its fan-in, so that every layer moves the residual stream. (The
    engine's own draws, 0.02 everywhere, give a model that repeats one token whatever
    came before, under which any two paths agree.) The embedding stays small: tied to the
    LM head, a large one would make each token predict itself."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    h, d = cfg.hidden_size, cfg.head_dim

    def proj(n, k):
        return torch.randn(n, k, generator=gen) / k ** 0.5

    def gain():
        return 1 + 0.1 * torch.randn(h, generator=gen)

    yield "model.embed_tokens.weight", 0.02 * torch.randn(cfg.vocab_size, h, generator=gen)
    for i in range(cfg.num_layers):
        layer = f"model.layers.{i}."
        yield layer + "self_attn.q_proj.weight", proj(cfg.num_heads * d, h)
        yield layer + "self_attn.k_proj.weight", proj(cfg.num_kv_heads * d, h)
        yield layer + "self_attn.v_proj.weight", proj(cfg.num_kv_heads * d, h)
        yield layer + "self_attn.o_proj.weight", proj(h, cfg.num_heads * d)
        yield layer + "mlp.gate_proj.weight", proj(cfg.intermediate_size, h)
        yield layer + "mlp.up_proj.weight", proj(cfg.intermediate_size, h)
        yield layer + "mlp.down_proj.weight", proj(h, cfg.intermediate_size)
        yield layer + "input_layernorm.weight", gain()
        yield layer + "post_attention_layernorm.weight", gain()
    yield "model.norm.weight", gain()
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", 0.02 * torch.randn(cfg.vocab_size, h, generator=gen)
