"""A candidate decode-attention kernel, for bench.paged_decode_tune to time against the
engine's (worker/embedded/kernels/paged_decode.py): the decodes' context tiles laid end to
end and cut into equal shares, one share a program.

The engine's kernel gives each (sequence, KV head) a program of its own (and, for small
batches, each of a few splits of its context). Two things then leave the memory system
idle. A program's first tile waits out the whole latency of its loads (the context length,
the block table, then the keys), which a context of one or two tiles never hides: run 24
read trtllm-bench's 128/128 decodes (512 sequences of ~181 tokens) at 1.6 TB/s over an FP8
cache. And programs of unequal length end unevenly: the serving mix of run 27 (127
decodes of 128-1,536 tokens) read at 3.2 TB/s, against 4.1-4.4 over 256 sequences of
1,536 tokens.

Here, for each KV head, every decode's context tiles are numbered in one sequence (row 0's
tiles, then row 1's, ...), and program p walks tiles [p * C, (p + 1) * C) with C = the
tiles over the programs, rounded up: every program has the same work, and its loop goes
on from one row's last tile to the next row's first, so the loads of the next row's tile
are in flight while the last row's finishes. A row that lies wholly within one program is
written by it; a row cut between programs leaves a partial output and log-sum-exp from
each, and a second kernel combines those rows (flash-decoding's combine).

The share is read on the device (PLAN: [C, W], W the tiles in all), as are the tiles' rows
and first tokens (TILE_ROW, TILE_TOK), so a CUDA graph captured once serves any mix of
lengths up to the map's size. The map is made on the host from the context lengths
(`plan`), as the engine's host loop already holds them each step.

Not used by the engine: a candidate to time. Correct against the float64 reference in
Triton's interpreter (tests/test_flat_decode.py) and, with `bench.paged_decode_tune
--kernels flat`, on the GPU.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from worker.embedded.kernels.kv_tile import cache_view, dot_query, kv_tile


@triton.jit
def _flat_decode(
    Q, K, V, O, PART_O, PART_LSE, TABLES, CTX_LENS, PLAN, TILE_ROW, TILE_TOK, scale, v_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_oh,
    stride_tb,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr,
    KV_FP8: tl.constexpr, K_WORDS: tl.constexpr, V_WORDS: tl.constexpr, ASM: tl.constexpr,
):
    p = tl.program_id(0)
    kvh = tl.program_id(1)
    num_kv = tl.num_programs(1)
    share = tl.load(PLAN)
    total = tl.load(PLAN + 1)
    lo = p * share
    hi = tl.minimum(total, lo + share)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    t = tl.arange(0, TILE)
    g_ok = g < GROUP
    heads = kvh * GROUP + g
    first_row = tl.load(TILE_ROW + lo, mask=lo < hi, other=0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for i in range(lo, hi):
        row = tl.load(TILE_ROW + i)
        # whether tile i is its row's last in this program, and its row's first tile overall
        next_row = tl.load(TILE_ROW + i + 1, mask=i + 1 < hi, other=-1)
        ends = next_row != row
        ctx = tl.load(CTX_LENS + row).to(tl.int32)
        tok0 = tl.load(TILE_TOK + i)
        tok = tok0 + t
        t_ok = tok < ctx
        q = tl.load(Q + row * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
        q = dot_query(q, KV_FP8, K_WORDS or V_WORDS, IEEE)
        blocks = tl.load(TABLES + row * stride_tb + tok // BLOCK_SIZE, mask=t_ok, other=0).to(tl.int64)
        offset = tok % BLOCK_SIZE
        k = kv_tile(K, blocks * stride_kb + offset * stride_kt + kvh * stride_kh, t_ok, HEAD_DIM, TILE, KV_FP8,
                    K_WORDS, ASM).to(q.dtype)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        pr = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(pr, 1)
        v = kv_tile(V, blocks * stride_vb + offset * stride_vt + kvh * stride_vh, t_ok, HEAD_DIM, TILE, KV_FP8,
                    V_WORDS, ASM).to(q.dtype)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(pr, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v).to(tl.float32)
        m = m_new
        # The row's last tile here: write it out (whole) or leave a partial (cut), and start afresh.
        first_tile = i - tok0 // TILE  # the row's first tile's number
        whole = (first_tile >= lo) & (first_tile + tl.cdiv(ctx, TILE) <= hi)
        cut = (first_tile < lo) | (first_tile + tl.cdiv(ctx, TILE) > hi)
        out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
        if KV_FP8:
            out = out * v_scale
        put = tl.where(ends & whole, g_ok, False)  # as blocks: Triton's interpreter broadcasts a scalar & to int32
        part = tl.where(ends & cut, g_ok, False)
        tl.store(O + row * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty),
                 mask=put[:, None])
        slot = (p * 2 + (row != first_row).to(tl.int32)) * num_kv * GROUP + heads  # [P, 2, Hq]: first row, last row
        tl.store(PART_O + slot[:, None] * HEAD_DIM + d[None, :], out, mask=part[:, None])
        lse = tl.where(l == 0.0, float("-inf"), m + tl.log(tl.where(l == 0.0, 1.0, l)))
        tl.store(PART_LSE + slot, lse, mask=part)
        m = tl.where(ends, float("-inf"), m)
        l = tl.where(ends, 0.0, l)
        acc = tl.where(ends, 0.0, acc)


@triton.jit
def _flat_combine(PART_O, PART_LSE, O, PLAN, ROW_TILE0, CTX_LENS, stride_ob, stride_oh, Hq,
                  TILE: tl.constexpr, HEAD_DIM: tl.constexpr, MAX_PARTS: tl.constexpr):
    """Rows cut between programs: their partials merged. A row whose tiles lie in one
    program (or with no context) was written whole, or is zeros."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    share = tl.load(PLAN)
    start = tl.load(ROW_TILE0 + b)
    n = tl.cdiv(tl.load(CTX_LENS + b).to(tl.int32), TILE)
    p0 = start // tl.maximum(share, 1)
    p1 = (start + n - 1) // tl.maximum(share, 1)
    d = tl.arange(0, HEAD_DIM)
    if n == 0:
        tl.store(O + b * stride_ob + h * stride_oh + d, tl.zeros([HEAD_DIM], tl.float32).to(O.dtype.element_ty))
    elif p1 > p0:
        k = tl.arange(0, MAX_PARTS)
        prog = p0 + k
        ok = prog <= p1
        # the row is its first program's last row, unless it starts that program's share
        last = (k == 0) & (start != p0 * share)
        slot = (prog * 2 + last.to(tl.int32)) * Hq + h
        lse = tl.load(PART_LSE + slot, mask=ok, other=float("-inf"))
        top = tl.max(lse, 0)
        w = tl.where(ok, tl.exp(lse - top), 0.0)
        o = tl.load(PART_O + slot[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0)
        out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
        tl.store(O + b * stride_ob + h * stride_oh + d, out.to(O.dtype.element_ty))


def plan(context_lens: list[int] | np.ndarray, programs: int, tile: int, size: int | None = None) -> dict[str, torch.Tensor]:
    """The map of one step's tiles, on the host: PLAN [share, tiles in all], each tile's row
    and first token (padded to `size` tiles, for a graph's fixed buffers), each row's first
    tile's number, and the most programs a row spans (the combine's width)."""
    lens = np.asarray(context_lens, dtype=np.int64)
    tiles = -(-lens // tile)
    total = int(tiles.sum())
    share = max(1, -(-total // programs))
    size = max(size or 0, total + 1)
    row = np.full(size, -1, dtype=np.int32)
    tok = np.zeros(size, dtype=np.int32)
    row[:total] = np.repeat(np.arange(len(lens), dtype=np.int32), tiles)
    starts = np.concatenate([[0], np.cumsum(tiles)[:-1]]).astype(np.int32)
    tok[:total] = (np.arange(total) - np.repeat(starts, tiles)) * tile
    spans = int(((starts + np.maximum(tiles, 1) - 1) // share - starts // share).max(initial=0)) + 1
    return {"plan": torch.tensor([share, total], dtype=torch.int32), "tile_row": torch.from_numpy(row),
            "tile_tok": torch.from_numpy(tok), "row_tile0": torch.from_numpy(starts), "max_parts": spans}


def flat_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, out=None, *, the_plan=None,
                          programs: int = 0, tile: int = 64, num_warps: int = 4, num_stages: int | None = None,
                          v_scale: float = 1.0) -> torch.Tensor:
    """paged_decode_attention's function by the flat kernel. `the_plan`: plan()'s map, on
    q's device (made here from context_lens, on the host, when not given); `programs`: the
    programs a KV head (0: enough for about 4 on every SM over all heads)."""
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    group = Hq // Hkv
    out = torch.empty_like(q) if out is None else out
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    if not programs:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
        programs = max(1, 4 * sms // Hkv)
    if the_plan is None:
        the_plan = {k: v.to(q.device) if isinstance(v, torch.Tensor) else v
                    for k, v in plan(context_lens.tolist(), programs, tile).items()}
    part_o = torch.empty((programs, 2, Hq, D), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((programs, 2, Hq), dtype=torch.float32, device=q.device)
    k_view, v_view = cache_view(k_cache), cache_view(v_cache)
    words = kv_fp8
    _flat_decode[(programs, Hkv)](
        q, k_view, v_view, out, part_o, part_lse, block_tables, context_lens, the_plan["plan"], the_plan["tile_row"],
        the_plan["tile_tok"], scale, v_scale,
        q.stride(0), q.stride(1),
        k_view.stride(0), k_view.stride(1), k_view.stride(2),
        v_view.stride(0), v_view.stride(1), v_view.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, BLOCK_SIZE=block_size, TILE=tile,
        IEEE=q.dtype == torch.float32, KV_FP8=kv_fp8, K_WORDS=words, V_WORDS=words, ASM=q.is_cuda,
        num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}),
    )
    _flat_combine[(B, Hq)](part_o, part_lse, out, the_plan["plan"], the_plan["row_tile0"], context_lens,
                           out.stride(0), out.stride(1), Hq, TILE=tile, HEAD_DIM=D,
                           MAX_PARTS=triton.next_power_of_2(max(2, the_plan["max_parts"])), num_warps=1)
    return out
