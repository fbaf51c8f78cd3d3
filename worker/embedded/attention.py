"""Attention over a paged KV cache.

The cache of one layer is [num_blocks, tokens_per_block, num_kv_heads, head_dim] for K
and V. A step's new tokens arrive flattened ([T, heads, dim]) with per-sequence query
lengths, context lengths and block tables. This reference path gathers each sequence's
context through its block table and runs one masked SDPA over the padded batch; it is
exact on CPU and GPU, and the place where GPU kernels drop in.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot (block * tokens_per_block + offset) per new token
    block_tables: torch.Tensor  # [B, max_blocks] int, padded with 0
    context_lens: torch.Tensor  # [B] tokens in context after this step, new ones included
    query_index: torch.Tensor  # [B, max_q] row of each sequence's i-th new token in [T]
    query_valid: torch.Tensor  # [B, max_q] bool
    attn_mask: torch.Tensor  # [B, 1, max_q, max_ctx] bool: causal over the paged context
    max_context_len: int


def build_mask(q_lens: torch.Tensor, ctx_lens: torch.Tensor, max_q: int, max_ctx: int) -> torch.Tensor:
    # Query i of a sequence sits at position ctx - q + i and sees keys 0..that position.
    i = torch.arange(max_q, device=q_lens.device)[None, :, None]
    j = torch.arange(max_ctx, device=q_lens.device)[None, None, :]
    last_visible = (ctx_lens - q_lens)[:, None, None] + i
    return (j <= last_visible)[:, None]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    bs = k_cache.shape[1]
    num_ctx_blocks = -(-meta.max_context_len // bs)
    tables = meta.block_tables[:, :num_ctx_blocks]
    B = tables.shape[0]
    k = k_cache[tables].reshape(B, num_ctx_blocks * bs, *k_cache.shape[2:])[:, : meta.max_context_len]
    v = v_cache[tables].reshape(B, num_ctx_blocks * bs, *v_cache.shape[2:])[:, : meta.max_context_len]
    qp = q[meta.query_index]  # [B, max_q, Hq, D]
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=meta.attn_mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[2],
    )
    return out.transpose(1, 2)[meta.query_valid]  # back to [T, Hq, D], sequence-major
