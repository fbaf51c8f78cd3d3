"""Attention over a paged KV cache.

The cache of one layer is [num_blocks, tokens_per_block, num_kv_heads, head_dim] for K
and V. A step's new tokens arrive flattened ([T, heads, dim]), decodes first.

Two paths compute the same function (KernelConfig.attention picks one):
- "reference" (CPU, and any device without Triton) gathers each sequence's context
  through its block table and runs one masked SDPA over the padded batch;
- "triton" (the default on CUDA) runs our Triton kernels: in decode-only steps the
  paged-decode kernel (kernels/paged_decode.py); in mixed steps captured in CUDA graphs
  the paged varlen kernel (kernels/paged_varlen.py) for every row, whatever its query
  length; in eager steps (larger than any graph) the paged-decode kernel for the decode
  rows, and for the prefills one variable-length flash-attention call over the step's
  fresh K/V (torch.nn.attention.varlen, where this torch has it, KernelConfig.
  varlen_prefill is on and no prefill continues a cached context), else the paged varlen
  kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from typing import Literal

import torch
import torch.nn.functional as F

# torch's varlen module logs its backend choice at INFO on every call: once a layer.
logging.getLogger("torch.nn.attention.varlen").setLevel(logging.WARNING)


@dataclasses.dataclass
class Tiles:
    """The paged varlen kernel's inputs (kernels/paged_varlen.py): its tile map and, per
    sequence, the first row of its new tokens, how many, its context after the step and
    its block table."""

    tile_seq: torch.Tensor
    tile_q: torch.Tensor
    seq_start: torch.Tensor
    seq_qlen: torch.Tensor
    seq_ctx: torch.Tensor
    tables: torch.Tensor


@dataclasses.dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot (block * tokens_per_block + offset) per new token
    attention: Literal["triton", "reference"] = "reference"  # which path's fields below are set
    # Reference path.
    block_tables: torch.Tensor | None = None  # [B, max_blocks] long, padded with 0
    query_index: torch.Tensor | None = None  # [B, max_q] row of each sequence's i-th new token in [T]
    query_valid: torch.Tensor | None = None  # [B, max_q] bool
    attn_mask: torch.Tensor | None = None  # [B, 1, max_q, max_ctx] bool: causal over the paged context
    max_context_len: int = 0
    # Triton path: rows [0, num_decodes) are one-token decodes for the paged-decode kernel;
    # the sequences of `tiles` go to the paged varlen kernel (a mixed step's graph: all of
    # them); prefills of nothing cached may instead go to one varlen flash-attention call
    # over their rows from num_decodes on: [P + 1] int32 row offsets, and the longest.
    num_decodes: int = 0
    decode_tables: torch.Tensor | None = None  # [num_decodes, W] int32
    decode_context_lens: torch.Tensor | None = None  # [num_decodes] int32
    flat: object | None = None  # kernels/flat_decode.FlatPlan: the decodes go to the flat kernel (decode_kernel "flat")
    tiles: Tiles | None = None
    prefill_cu_seq: torch.Tensor | None = None
    prefill_max_len: int = 0


def build_mask(q_lens: torch.Tensor, ctx_lens: torch.Tensor, max_q: int, max_ctx: int) -> torch.Tensor:
    # Query i of a sequence sits at position ctx - q + i and sees keys 0..that position.
    i = torch.arange(max_q, device=q_lens.device)[None, :, None]
    j = torch.arange(max_ctx, device=q_lens.device)[None, None, :]
    last_visible = (ctx_lens - q_lens)[:, None, None] + i
    return (j <= last_visible)[:, None]


FP8_MAX = 448.0  # float8 E4M3's largest finite value: an FP8 cache clamps to it


def to_cache(x: torch.Tensor, cache_dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """x as the cache stores it. An FP8 cache holds x / scale (the layer's calibrated
    scale, kv_quant.py), in float32 then clamped to +-448 (torch's cast would turn what
    lies beyond into NaN) and rounded once: what the rotary-and-cache kernel writes."""
    if cache_dtype == torch.float8_e4m3fn:
        return (x.float() * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(cache_dtype)
    return x.to(cache_dtype)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
             k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    k_cache.view(-1, *k_cache.shape[2:])[slots] = to_cache(k, k_cache.dtype, k_scale)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = to_cache(v, v_cache.dtype, v_scale)


def paged_attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, pdl: bool,
                    k_scale: float = 1.0, v_scale: float = 1.0, decode_tile: int | None = None,
                    rows_outer: bool = False) -> torch.Tensor:
    """q, k, v: this step's new tokens [T, heads, dim], already written to the cache; `pdl`
    allows the decode kernel programmatic dependent launch (KernelConfig.pdl), `decode_tile`
    sets its tokens a loop iteration (KernelConfig.decode_tile; None: its own choice), and
    `rows_outer` starts its programs row by row (KernelConfig.decode_order). The cache
    holds keys / k_scale and values / v_scale (an FP8 cache's calibrated scales; 1
    otherwise): the kernels fold k_scale into the softmax scale and v_scale into the output."""
    if meta.attention == "reference":
        return _reference(q, k_cache, v_cache, meta, scale, k_scale, v_scale)
    out = torch.empty_like(q)
    if meta.num_decodes:
        from worker.embedded.kernels.paged_decode import paged_decode_attention

        n = meta.num_decodes
        if meta.flat is not None:
            from worker.embedded.kernels.flat_decode import flat_decode_attention

            flat_decode_attention(q[:n], k_cache, v_cache, scale * k_scale, out[:n], meta.flat, v_scale=v_scale)
        else:
            paged_decode_attention(q[:n], k_cache, v_cache, meta.decode_tables, meta.decode_context_lens,
                                   scale * k_scale, out[:n], pdl=pdl, v_scale=v_scale, tile=decode_tile,
                                   rows_outer=rows_outer)
    if meta.prefill_cu_seq is not None:
        rows = slice(meta.num_decodes, q.shape[0])
        out[rows] = varlen_prefill(q[rows], k[rows], v[rows], meta.prefill_cu_seq, meta.prefill_max_len, scale)
    if meta.tiles is not None:
        from worker.embedded.kernels.paged_varlen import paged_varlen_attention

        t = meta.tiles
        paged_varlen_attention(q, k_cache, v_cache, out, t.tile_seq, t.tile_q, t.seq_start, t.seq_qlen, t.seq_ctx,
                               t.tables, scale * k_scale, v_scale=v_scale)
    return out


def varlen_available(dtype: torch.dtype) -> bool:
    """Whether varlen_prefill can run here: flash attention takes 16-bit inputs only."""
    return dtype in (torch.float16, torch.bfloat16) and _varlen_options() is not None


@functools.cache
def _varlen_options() -> tuple[dict, bool] | None:
    """Keywords for causal, grouped-query varlen_attn, which changed across torch
    versions (is_causal, later window_size and enable_gqa), and whether it takes a
    scale; None without it. Looked up once: varlen_prefill runs once a layer."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    options = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "enable_gqa" in params:
        options["enable_gqa"] = True
    return options, "scale" in params


def varlen_prefill(q, k, v, cu_seq: torch.Tensor, max_len: int, scale: float) -> torch.Tensor:
    """Causal attention of packed sequences over their own tokens: q [T, Hq, D], k and v
    [T, Hkv, D], `cu_seq` [N + 1] int32 offsets. One launch for every sequence of a step
    where SDPA per sequence cost ~8 launches each."""
    from torch.nn.attention.varlen import varlen_attn

    options, takes_scale = _varlen_options()
    if takes_scale:
        options = {**options, "scale": scale}
    elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:  # older torch: the default 1/sqrt(D) only
        raise ValueError("this torch's varlen_attn takes no scale")
    return varlen_attn(q, k, v, cu_seq, cu_seq, max_len, max_len, **options)


def _reference(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, k_scale: float = 1.0,
               v_scale: float = 1.0) -> torch.Tensor:
    bs = k_cache.shape[1]
    num_ctx_blocks = -(-meta.max_context_len // bs)
    tables = meta.block_tables[:, :num_ctx_blocks]
    B = tables.shape[0]
    k = k_cache[tables].reshape(B, num_ctx_blocks * bs, *k_cache.shape[2:])[:, : meta.max_context_len].to(q.dtype)
    v = v_cache[tables].reshape(B, num_ctx_blocks * bs, *v_cache.shape[2:])[:, : meta.max_context_len].to(q.dtype)
    if k_scale != 1.0 or v_scale != 1.0:  # an FP8 cache's calibrated scales
        k, v = k * k_scale, v * v_scale
    qp = q[meta.query_index]  # [B, max_q, Hq, D]
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=meta.attn_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[2],
    )
    return out.transpose(1, 2)[meta.query_valid]  # back to [T, Hq, D], sequence-major
