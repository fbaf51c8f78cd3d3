"""Decode attention over the paged KV cache: one new query token per sequence.

One program per (sequence, KV head) handles that head's whole group of query heads
(grouped-query attention), walking the sequence's context in tiles of TILE tokens that
may span several KV blocks, with an online softmax. Context lengths are read on the
device, so one launch (and one CUDA graph) serves any mix of lengths; a sequence of
length 0 (a padding row of a captured graph) gets zeros."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode(
    Q, K, V, O, TABLES, CTX_LENS, scale,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_oh,
    stride_tb,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(CTX_LENS + b)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    t = tl.arange(0, TILE)
    g_ok = g < GROUP
    heads = kvh * GROUP + g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for start in range(0, ctx, TILE):
        tok = start + t
        t_ok = tok < ctx
        blocks = tl.load(TABLES + b * stride_tb + tok // BLOCK_SIZE, mask=t_ok, other=0)
        offset = tok % BLOCK_SIZE
        k = tl.load(K + blocks[:, None] * stride_kb + offset[:, None] * stride_kt + kvh * stride_kh + d[None, :],
                    mask=t_ok[:, None], other=0.0)
        if IEEE:  # float32 models keep float32 products (no tf32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # [GROUP_PAD, TILE]
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(V + blocks[:, None] * stride_vb + offset[:, None] * stride_vt + kvh * stride_vh + d[None, :],
                    mask=t_ok[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m = m_new
    l = tl.where(l == 0.0, 1.0, l)
    out = acc / l[:, None]
    tl.store(O + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty), mask=g_ok[:, None])


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    group = Hq // Hkv
    out = torch.empty_like(q) if out is None else out
    tile = max(64, block_size)
    _paged_decode[(B, Hkv)](
        q, k_cache, v_cache, out, block_tables, context_lens, scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=D,
        BLOCK_SIZE=block_size, TILE=tile, IEEE=q.dtype == torch.float32,
        num_warps=4,
    )
    return out


def paged_decode_reference(q, k_cache, v_cache, block_tables, context_lens, scale) -> torch.Tensor:
    """The same function in float64 PyTorch, one sequence at a time."""
    B, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(B, Hq, D, dtype=torch.float64, device=q.device)
    for b in range(B):
        n = int(context_lens[b])
        if n == 0:
            continue
        blocks = block_tables[b, : -(-n // bs)].long()
        k = k_cache[blocks].reshape(-1, Hkv, D)[:n].double().repeat_interleave(Hq // Hkv, dim=1)
        v = v_cache[blocks].reshape(-1, Hkv, D)[:n].double().repeat_interleave(Hq // Hkv, dim=1)
        s = torch.einsum("hd,thd->ht", q[b].double(), k) * scale
        out[b] = torch.einsum("ht,thd->hd", s.softmax(-1), v)
    return out
