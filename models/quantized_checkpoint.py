"""Checkpoints shipped already quantized: which scheme their `quantization_config` (or
Model Optimizer's hf_quant_config.json) describes, and their tensors made ready to load.

Read:
- compressed-tensors / llm-compressor (`quant_method: compressed-tensors`), formats
  float-quantized, int-quantized and naive-quantized: 8-bit symmetric weights with a
  `weight_scale` per output channel (strategy channel) or per tensor (strategy tensor),
  FP8 weights with FP8 input activations (-> fp8), int8 weights without input
  activations (-> int8-weight-only) or with int8 ones (-> int8-smoothquant; the smoothing
  is already in the weights and norms).
- NVIDIA Model Optimizer (`quant_method: modelopt`, or hf_quant_config.json), quant_algo
  FP8 (per-tensor weight_scale) and FP8_PER_CHANNEL_PER_TOKEN.
Activations are always quantized per token at run time: a checkpoint's static
`input_scale` is read past. KV cache scales (k_scale, v_scale: ModelOpt's
kv_cache_quant_algo, compressed-tensors' kv_cache_scheme) are collected for the engine:
with --kv-cache-dtype fp8 it uses them when every layer has both, and calibrates its own
otherwise (worker/embedded/kv_quant.py); without, the cache is the model's dtype.
Anything else (4-bit, groups or blocks, asymmetric, other methods) is a ModelError naming
the format and what it holds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from models.errors import ModelError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FORMATS = ("compressed-tensors", "modelopt")
SKIPPED_TENSORS = (".input_scale", ".k_scale", ".v_scale")  # suffixes read past (module docstring)
# A layer's KV cache scale: ModelOpt's self_attn.k_proj.k_scale, compressed-tensors' self_attn.k_scale.
KV_SCALE_NAME = re.compile(r"layers\.(\d+)\.self_attn\.(?:[kv]_proj\.)?([kv])_scale$")
QUANTIZED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class CheckpointQuantization:
    format: str  # one of FORMATS
    scheme: str  # an EngineConfig.quantization value
    weight_dtype: str  # the name of the torch dtype its weights are stored in


def read_quantization(model_dir: Path, config: dict) -> CheckpointQuantization | None:
    """The checkpoint's quantization, from config.json's quantization_config or Model
    Optimizer's hf_quant_config.json; None for an unquantized checkpoint."""
    qc = config.get("quantization_config")
    hf_quant = Path(model_dir) / "hf_quant_config.json"
    if qc is None and hf_quant.exists():
        try:
            qc = {"quant_method": "modelopt", **json.loads(hf_quant.read_text())}
        except ValueError as e:
            raise ModelError(f"{hf_quant}: unreadable: {e}") from None
    if qc is None:
        return None
    return parse_quantization_config(qc)


def parse_quantization_config(qc: dict) -> CheckpointQuantization:
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method == "modelopt":
        return _modelopt(qc.get("quantization", qc))
    raise ModelError(f"quantization_config quant_method {method!r} is not supported (supported: {', '.join(FORMATS)})")


def _compressed_tensors(qc: dict) -> CheckpointQuantization:
    where = "compressed-tensors quantization_config"
    fmt = qc.get("format")
    if fmt not in ("float-quantized", "int-quantized", "naive-quantized"):
        raise ModelError(f"{where}: format {fmt!r} is not supported (supported: float-quantized, int-quantized, naive-quantized)")
    if qc.get("kv_cache_scheme"):
        log.info("%s: kv_cache_scheme: its k_scale/v_scale serve --kv-cache-dtype fp8 (else the KV cache is the "
                 "model's dtype)", where)
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise ModelError(f"{where}: {len(groups)} config_groups; one group for every Linear layer is supported")
    group = groups[0]
    if "Linear" not in group.get("targets", []):
        raise ModelError(f"{where}: targets {group.get('targets')} (supported: ['Linear'])")
    for ignored in qc.get("ignore") or []:
        if "lm_head" not in ignored:
            raise ModelError(f"{where}: ignore {ignored!r}: only lm_head may stay unquantized")
    w, a = group.get("weights") or {}, group.get("input_activations")
    desc = f"weights {w.get('type')} {w.get('num_bits')}-bit {w.get('strategy')}"
    if w.get("num_bits") != 8 or w.get("type") not in ("float", "int") or not w.get("symmetric", True) \
            or w.get("strategy") not in ("channel", "tensor"):
        raise ModelError(f"{where}: {desc}{'' if w.get('symmetric', True) else ' asymmetric'} is not supported "
                         "(supported: 8-bit symmetric int or float weights, strategy channel or tensor)")
    if a is not None and (a.get("num_bits") != 8 or a.get("type") != w.get("type") or not a.get("symmetric", True)):
        raise ModelError(f"{where}: {desc} with input activations {a.get('type')} {a.get('num_bits')}-bit is not supported")
    if w["type"] == "float":
        if a is None:
            raise ModelError(f"{where}: FP8 weights without FP8 input activations (FP8 weight-only) are not supported")
        return CheckpointQuantization("compressed-tensors", "fp8", "float8_e4m3fn")
    return CheckpointQuantization("compressed-tensors", "int8-weight-only" if a is None else "int8-smoothquant", "int8")


def _modelopt(qc: dict) -> CheckpointQuantization:
    algo = qc.get("quant_algo")
    if algo not in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN"):
        raise ModelError(f"modelopt quantization quant_algo {algo!r} is not supported (supported: FP8, FP8_PER_CHANNEL_PER_TOKEN)")
    for excluded in qc.get("exclude_modules") or []:
        if "lm_head" not in excluded:
            raise ModelError(f"modelopt quantization: exclude_modules {excluded!r}: only lm_head may stay unquantized")
    if qc.get("kv_cache_quant_algo"):
        log.info("modelopt kv_cache_quant_algo %s: its k_scale/v_scale serve --kv-cache-dtype fp8 (else the KV cache is "
                 "the model's dtype)", qc["kv_cache_quant_algo"])
    return CheckpointQuantization("modelopt", "fp8", "float8_e4m3fn")


def quantized_tensors(named: Iterable[tuple[str, torch.Tensor]], quant: CheckpointQuantization,
                      dtype: torch.dtype, kv_scales: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """A quantized checkpoint's tensors as LlamaForCausalLM.load_hf_weights takes them:
    8-bit weights as they are, weight scales as float32 vectors (one per output channel,
    or one for the tensor, which loading spreads over its channels), everything else in
    `dtype`, the tensors in SKIPPED_TENSORS left out. KV cache scales go into `kv_scales`
    as {(layer, "k" or "v"): float} (the largest, where a scale has several values)."""
    import torch

    weight_dtype = getattr(torch, quant.weight_dtype)
    for name, t in named:
        if name.endswith(SKIPPED_TENSORS):
            kv = KV_SCALE_NAME.search(name)
            if kv is not None and kv_scales is not None:
                kv_scales[int(kv.group(1)), kv.group(2)] = float(t.float().max())
            continue
        if name.endswith((".weight_zero_point", ".weight_g_idx")):
            raise ModelError(f"{quant.format} checkpoint: {name}: zero points and group indices are not supported")
        quantized = name.endswith(".weight_scale") or t.dtype in (torch.int8, torch.float8_e4m3fn)
        if quantized and name.split(".")[-2] not in QUANTIZED_MODULES:
            raise ModelError(f"{quant.format} checkpoint: {name}: only the layers' {', '.join(QUANTIZED_MODULES)} "
                             "may be quantized")
        if name.endswith(".weight_scale"):
            yield name, t.float().reshape(-1)
        elif t.dtype in (torch.int8, torch.float8_e4m3fn):
            if t.dtype != weight_dtype:
                raise ModelError(f"{quant.format} checkpoint: {name} is {t.dtype}, its quantization_config says {quant.weight_dtype}")
            yield name, t
        elif t.dtype in (torch.uint8, torch.int32):
            raise ModelError(f"{quant.format} checkpoint: {name} is packed ({t.dtype}); packed weights are not supported")
        else:
            yield name, t.to(dtype)
