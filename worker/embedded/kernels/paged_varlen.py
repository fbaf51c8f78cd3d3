"""Attention over the paged KV cache for any mix of query lengths: prefills (fresh or
continuing a cached prefix), chunks of a long prompt, and one-token decodes, in one launch
whose shape depends only on how many tiles it was sized for. That makes a whole mixed
prefill-and-decode step capturable in one CUDA graph (the decode-only kernel in
paged_decode.py stays the faster one for decode-only steps).

Each sequence's new tokens are rows [start, start + qlen) of the step's [T, heads, dim]
queries, already written to the cache; after this step the sequence holds `ctx` tokens, so
its i-th new token sits at position ctx - qlen + i and sees keys 0 to that position. A
program takes BLOCK_Q consecutive query tokens of one sequence and, for one KV head, its
whole group of query heads (grouped-query attention), as BLOCK_Q * GROUP_PAD rows of one
matrix, and walks the context in tiles of TILE tokens (spanning several KV blocks) with an
online softmax, stopping at its last query's position (causal).

Which (sequence, first query) each program takes comes from a tile map the host builds
(`tile_map`); entries past the used ones hold sequence -1 and their programs return at
once, so a launch sized for the largest step of a graph serves every smaller one."""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from worker.embedded.kernels.kv_tile import cache_view, dot_query, kv_tile

ROWS = 64  # query rows (tokens x heads of a group) per program


def block_q(group: int, rows: int = ROWS) -> int:
    """Query tokens per program for a model whose KV heads each serve `group` query heads."""
    return max(1, rows // group_pad(group))


def group_pad(group: int) -> int:
    return triton.next_power_of_2(group)


LOG2E = 1.4426950408889634  # the scores are kept in base 2: exp2 is one instruction, exp two


@triton.jit
def _paged_varlen(
    Q, K, V, O, TILE_SEQ, TILE_Q, SEQ_START, SEQ_QLEN, SEQ_CTX, TABLES, qk_scale, v_scale,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_tb,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr,
    KV_FP8: tl.constexpr, FP8_WORDS: tl.constexpr, ASM: tl.constexpr,
):
    p = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.load(TILE_SEQ + p)
    if s < 0:
        return
    # int32 index math whatever the inputs' dtype: 64-bit tokens and block offsets slowed the
    # paged-decode kernel by up to 43% (BENCHMARKS.md, run 15)
    q0 = tl.load(TILE_Q + p).to(tl.int32)
    start = tl.load(SEQ_START + s).to(tl.int32)
    qlen = tl.load(SEQ_QLEN + s).to(tl.int32)
    ctx = tl.load(SEQ_CTX + s).to(tl.int32)
    r = tl.arange(0, BLOCK_Q * GROUP_PAD)
    qi = q0 + r // GROUP_PAD  # the row's query token, within the sequence's new ones
    g = r % GROUP_PAD
    row_ok = (qi < qlen) & (g < GROUP)
    heads = kvh * GROUP + g
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + (start + qi)[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    q = dot_query(q, KV_FP8, FP8_WORDS, IEEE)
    qpos = ctx - qlen + qi
    first = ctx - qlen + q0  # the program's first query position: every row sees keys 0 to it
    hi = tl.minimum(ctx, first + BLOCK_Q)  # past the program's last query position
    m = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], tl.float32)
    table = TABLES + s.to(tl.int64) * stride_tb
    # Tiles every row sees whole take no causal mask; the ones after, up to the last query,
    # do. The first tile (key 0, which every row sees) leaves each row's max finite, so no
    # row meets a tile of -inf against a max of -inf.
    whole = (first + 1) // TILE * TILE
    for lo in range(0, whole, TILE):
        acc, m, l = _attend(q, acc, m, l, K, V, table, lo, kvh, qpos, hi, qk_scale,
                            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                            HEAD_DIM, BLOCK_SIZE, TILE, IEEE, KV_FP8, FP8_WORDS, ASM, False)
    for lo in range(whole, hi, TILE):
        acc, m, l = _attend(q, acc, m, l, K, V, table, lo, kvh, qpos, hi, qk_scale,
                            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                            HEAD_DIM, BLOCK_SIZE, TILE, IEEE, KV_FP8, FP8_WORDS, ASM, True)
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    if KV_FP8:  # an FP8 cache holds values / v_scale
        out = out * v_scale
    tl.store(O + (start + qi)[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _attend(q, acc, m, l, K, V, table, lo, kvh, qpos, hi, qk_scale,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr,
            KV_FP8: tl.constexpr, FP8_WORDS: tl.constexpr, ASM: tl.constexpr, CAUSAL: tl.constexpr):
    """One tile of TILE keys from `lo` into the online softmax (base 2: qk_scale holds
    log2(e)); CAUSAL masks keys past each row's position and past `hi`."""
    tok = lo + tl.arange(0, TILE)
    t_ok = tok < hi
    blocks = tl.load(table + tok // BLOCK_SIZE, mask=t_ok, other=0).to(tl.int64)
    offset = tok % BLOCK_SIZE
    k = kv_tile(K, blocks * stride_kb + offset * stride_kt + kvh * stride_kh, t_ok, HEAD_DIM, TILE, KV_FP8,
                FP8_WORDS, ASM).to(q.dtype)
    if IEEE:  # float32 models keep float32 products (no tf32)
        sc = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    else:
        sc = tl.dot(q, tl.trans(k)).to(tl.float32) * qk_scale
    if CAUSAL:
        sc = tl.where(t_ok[None, :] & (tok[None, :] <= qpos[:, None]), sc, float("-inf"))
    m_new = tl.maximum(m, tl.max(sc, 1))
    alpha = tl.exp2(m - m_new)
    pr = tl.exp2(sc - m_new[:, None])
    l = l * alpha + tl.sum(pr, 1)
    v = kv_tile(V, blocks * stride_vb + offset * stride_vt + kvh * stride_vh, t_ok, HEAD_DIM, TILE, KV_FP8,
                FP8_WORDS, ASM).to(q.dtype)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(pr, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v).to(tl.float32)
    return acc, m_new, l


def tile_map(q_lens, bq: int, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sequence, first query) of each program for sequences of `q_lens` new tokens, `bq`
    tokens a program; padded with sequence -1 to `size` entries (None: just the used)."""
    q_lens = np.asarray(q_lens, dtype=np.int64)
    per = -(-q_lens // bq)
    seq = np.repeat(np.arange(len(q_lens)), per)
    first = (np.arange(len(seq)) - np.repeat(np.cumsum(per) - per, per)) * bq
    if size is not None:
        if len(seq) > size:
            raise ValueError(f"{len(seq)} tiles do not fit a map of {size}")
        seq = np.concatenate([seq, np.full(size - len(seq), -1)])
        first = np.concatenate([first, np.zeros(size - len(first), dtype=np.int64)])
    return seq, first


def max_tiles(tokens: int, seqs: int, bq: int) -> int:
    """Programs enough for any step of at most `tokens` new tokens over at most `seqs` sequences."""
    return -(-tokens // bq) + min(tokens, seqs)


def paged_varlen_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    out: torch.Tensor,  # [T, Hq, D]: rows of no sequence are left as they are
    tile_seq: torch.Tensor,  # [tiles] from tile_map
    tile_q: torch.Tensor,
    seq_start: torch.Tensor,  # [S] first row of each sequence's new tokens
    seq_qlen: torch.Tensor,  # [S] its new tokens
    seq_ctx: torch.Tensor,  # [S] its context after this step, new tokens included
    tables: torch.Tensor,  # [S, W] its block table
    scale: float,  # the softmax scale, times k_scale where the cache holds keys / k_scale
    v_scale: float = 1.0,  # the cache holds values / v_scale (kv_cache.dtype fp8)
    fp8_read: str = "words",  # how an FP8 cache is read (kv_tile.py); "cast" is the baseline benches time
    rows: int = ROWS,  # query rows a program (the tile map's block_q must match)
    # Context tokens a loop iteration; None: 128 over an FP8 cache, 64 over a 16-bit one (or the
    # KV block if larger), the fastest on the 8B and 1B heads (BENCHMARKS.md, run 24).
    tile: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,  # None: Triton's default
) -> torch.Tensor:
    _, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    group = Hq // Hkv
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    k_cache, v_cache = cache_view(k_cache, fp8_read), cache_view(v_cache, fp8_read)
    _paged_varlen[(tile_seq.shape[0], Hkv)](
        q, k_cache, v_cache, out, tile_seq, tile_q, seq_start, seq_qlen, seq_ctx, tables, scale * LOG2E, v_scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad(group), HEAD_DIM=D, BLOCK_SIZE=block_size, BLOCK_Q=block_q(group, rows),
        TILE=tile or max(128 if kv_fp8 else 64, block_size), IEEE=q.dtype == torch.float32,
        KV_FP8=kv_fp8, FP8_WORDS=fp8_read == "words", ASM=q.device.type == "cuda", num_warps=num_warps,
        **({"num_stages": num_stages} if num_stages else {}),
    )
    return out


def paged_varlen_reference(q, k_cache, v_cache, seq_start, seq_qlen, seq_ctx, tables, scale) -> torch.Tensor:
    """The same function in float64 PyTorch, one sequence at a time; rows of no sequence are 0."""
    T, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(T, Hq, D, dtype=torch.float64, device=q.device)
    for start, n, ctx, table in zip(seq_start.tolist(), seq_qlen.tolist(), seq_ctx.tolist(), tables):
        blocks = table[: -(-ctx // bs)].long()
        k = k_cache[blocks].reshape(-1, Hkv, D)[:ctx].double().repeat_interleave(Hq // Hkv, dim=1)
        v = v_cache[blocks].reshape(-1, Hkv, D)[:ctx].double().repeat_interleave(Hq // Hkv, dim=1)
        s = torch.einsum("qhd,thd->hqt", q[start : start + n].double(), k) * scale
        visible = torch.arange(ctx)[None, :] <= (ctx - n + torch.arange(n))[:, None]
        s = s.masked_fill(~visible.to(s.device), float("-inf"))
        out[start : start + n] = torch.einsum("hqt,thd->qhd", s.softmax(-1), v)
    return out
