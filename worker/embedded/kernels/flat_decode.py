"""Decode attention over the paged KV cache with the decodes' context tiles laid end to
end and cut into equal shares, one share a program (KernelConfig.decode_kernel "flat"; the
default is kernels/paged_decode.py, one program a sequence and KV head).

Two things leave the memory system idle under the one-program-a-sequence kernel. A
program's first tile waits out the whole latency of its loads (the context length, the
block table, then the keys), which a context of one or two tiles never hides: run 24 read
trtllm-bench's 128/128 decodes (512 sequences of ~181 tokens) at 1.6 TB/s over an FP8
cache. And programs of unequal length end unevenly: the serving mix of run 27 (127 decodes
of 128-1,536 tokens) read at 3.2 TB/s, against 4.1-4.4 over 256 sequences of 1,536 tokens.

Here, for each KV head, every decode's context tiles are numbered in one sequence (row 0's
tiles, then row 1's, ...), and program p walks tiles [p * C, (p + 1) * C), C the tiles over
the programs, rounded up: every program has the same work, and its loop goes on from one
row's last tile to the next row's first, so the next row's loads are in flight while the
last row's finish. A row that lies wholly within one program is written by it; a row cut
between programs leaves a partial output and log-sum-exp from each, and a second kernel
merges those (flash-decoding's combine) and writes zeros for rows of no context.

The map (`flat_plan`: the share; each tile's row, first token, valid tokens, cache blocks and
its row's last tile; each row's first tile) is made from the context lengths and block
tables by a few tensor operations on the device, so a CUDA graph
recomputes it on every replay and serves any mix of lengths. Untimed on a GPU in the
engine: `bench.paged_decode_tune --kernels flat` times the kernel alone.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from worker.embedded.kernels.kv_tile import cache_view, dot_query, kv_tile

PROGRAMS_PER_SM = 4  # programs an SM, over all KV heads (bench.paged_decode_tune --flat-per-sm times others)


@triton.jit
def _flat_decode(
    Q, K, V, O, PART_O, PART_LSE, PLAN, TILE_ROW, TILE_TOK, TILE_LEN, TILE_LAST, TILE_BLOCKS, scale, v_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, NB: tl.constexpr, IEEE: tl.constexpr,
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
        # whether tile i is its row's last in this program (the program's last tile always is)
        next_row = tl.load(TILE_ROW + i + 1, mask=i + 1 < hi, other=-1)
        ends = next_row != row
        tok0 = tl.load(TILE_TOK + i)
        # The tile's cache blocks and valid tokens come from the map by the tile's number
        # alone, not through its row: the loads the keys wait for are one step from i, as
        # the paged kernel's are.
        t_ok = t < tl.load(TILE_LEN + i)
        blocks = tl.load(TILE_BLOCKS + i * NB + t // BLOCK_SIZE, mask=t_ok, other=0).to(tl.int64)
        offset = (tok0 + t) % BLOCK_SIZE
        q = tl.load(Q + row * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
        q = dot_query(q, KV_FP8, K_WORDS or V_WORDS, IEEE)
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
        first_tile = i - tok0 // TILE  # the row's first and last tiles' numbers
        last_tile = tl.load(TILE_LAST + i)
        whole = (first_tile >= lo) & (last_tile < hi)  # all of the row's tiles are here
        cut = (first_tile < lo) | (last_tile >= hi)  # (not whole)
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
def _flat_combine(PART_O, PART_LSE, O, PLAN, ROW_TILES, stride_ob, stride_oh, Hq, HEAD_DIM: tl.constexpr):
    """Rows cut between programs: their partials merged, in program order. A row whose
    tiles lie in one program was written whole; a row of no context gets zeros."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    share = tl.maximum(tl.load(PLAN), 1)
    start = tl.load(ROW_TILES + b)
    n = tl.load(ROW_TILES + b + 1) - start
    p0 = start // share
    p1 = (start + n - 1) // share
    d = tl.arange(0, HEAD_DIM)
    if n == 0:
        tl.store(O + b * stride_ob + h * stride_oh + d, tl.zeros([HEAD_DIM], tl.float32).to(O.dtype.element_ty))
    elif p1 > p0:
        m = tl.full([], float("-inf"), tl.float32)
        total = tl.zeros([], tl.float32)
        acc = tl.zeros([HEAD_DIM], tl.float32)
        for prog in range(p0, p1 + 1):
            # the row is its first program's last row, unless it starts that program's share
            last = (prog == p0) & (start != p0 * share)
            slot = (prog * 2 + last.to(tl.int32)) * Hq + h
            lse = tl.load(PART_LSE + slot)
            m_new = tl.maximum(m, lse)
            alpha = tl.exp(m - m_new)
            w = tl.exp(lse - m_new)
            acc = acc * alpha + w * tl.load(PART_O + slot * HEAD_DIM + d)
            total = total * alpha + w
            m = m_new
        tl.store(O + b * stride_ob + h * stride_oh + d, (acc / total).to(O.dtype.element_ty))


@dataclasses.dataclass
class FlatPlan:
    """One step's map of the decodes' tiles and the partials' buffers (flat_plan)."""

    share_total: torch.Tensor  # [2] int32: tiles a program, tiles in all
    tile_row: torch.Tensor  # [max_tiles + 1] int32: each tile's row (-1 past the last)
    tile_tok: torch.Tensor  # [max_tiles + 1] int32: each tile's first token in its row
    tile_len: torch.Tensor  # [max_tiles + 1] int32: each tile's tokens (0 past the last tile)
    tile_last: torch.Tensor  # [max_tiles + 1] int32: the number of each tile's row's last tile
    tile_blocks: torch.Tensor  # [max_tiles + 1, NB] int32: each tile's cache blocks, from its row's block table
    row_tiles: torch.Tensor  # [B + 1] int32: each row's first tile, then the tiles in all
    part_o: torch.Tensor  # [programs, 2, Hq, D] float32: each program's first and last row, when cut
    part_lse: torch.Tensor  # [programs, 2, Hq] float32
    programs: int
    tile: int


def flat_plan(context_lens: torch.Tensor, block_tables: torch.Tensor, block_size: int, programs: int, tile: int,
              num_heads: int, head_dim: int) -> FlatPlan:
    """The map of the tiles of rows with these context lengths and block tables, on their
    device, by tensor operations alone (a CUDA graph captures them): `programs` a KV head,
    `tile` tokens a tile, room for as many tiles as the block tables can hold."""
    dev = context_lens.device
    max_tiles = block_tables.shape[0] * -(-block_tables.shape[1] * block_size // tile)
    ctx = context_lens.to(torch.int32)
    tiles = (ctx + (tile - 1)) // tile
    ends = torch.cumsum(tiles, 0, dtype=torch.int32)
    starts = ends - tiles
    total = ends[-1:]
    share = torch.clamp((total + (programs - 1)) // programs, min=1)
    idx = torch.arange(max_tiles + 1, dtype=torch.int32, device=dev)
    live = idx < total
    row = torch.searchsorted(ends, idx, right=True).to(torch.int32)  # ends[row - 1] <= i < ends[row]
    row_c = row.clamp(max=len(ends) - 1).long()
    tok = (idx - starts[row_c]) * tile
    per_tile = max(1, tile // block_size)
    blk = (tok // block_size)[:, None] + torch.arange(per_tile, dtype=torch.int32, device=dev)[None, :]
    blocks = block_tables[row_c[:, None], blk.clamp(max=block_tables.shape[1] - 1).long()]
    return FlatPlan(share_total=torch.cat([share, total]).to(torch.int32), tile_row=torch.where(live, row, -1),
                    tile_tok=tok.to(torch.int32),
                    tile_len=torch.where(live, (ctx[row_c] - tok).clamp(0, tile), 0).to(torch.int32),
                    tile_last=(ends[row_c] - 1).to(torch.int32), tile_blocks=blocks.to(torch.int32).contiguous(),
                    row_tiles=torch.cat([starts, total]),
                    part_o=torch.empty((programs, 2, num_heads, head_dim), dtype=torch.float32, device=dev),
                    part_lse=torch.empty((programs, 2, num_heads), dtype=torch.float32, device=dev),
                    programs=programs, tile=tile)


def flat_programs(device: torch.device, num_kv_heads: int) -> int:
    """Programs a KV head: PROGRAMS_PER_SM on every SM over all heads."""
    from worker.embedded.kernels.paged_decode import _num_sms

    return max(1, PROGRAMS_PER_SM * _num_sms(device) // num_kv_heads)


def flat_decode_attention(q, k_cache, v_cache, scale, out, plan: FlatPlan, v_scale: float = 1.0, num_warps: int = 4,
                          num_stages: int | None = None) -> torch.Tensor:
    """paged_decode_attention's function (q [B, Hq, D], the cache [blocks, block size, Hkv,
    D], one new token a row) by the flat kernel over `plan`'s map (flat_plan, made from the
    rows' context lengths and block tables: the kernels read nothing else of them). An FP8
    cache is read as words (kv_tile.py) and holds values / v_scale."""
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    k_view, v_view = cache_view(k_cache), cache_view(v_cache)
    _flat_decode[(plan.programs, Hkv)](
        q, k_view, v_view, out, plan.part_o, plan.part_lse, plan.share_total, plan.tile_row, plan.tile_tok, plan.tile_len,
        plan.tile_last, plan.tile_blocks, scale, v_scale,
        q.stride(0), q.stride(1),
        k_view.stride(0), k_view.stride(1), k_view.stride(2),
        v_view.stride(0), v_view.stride(1), v_view.stride(2),
        out.stride(0), out.stride(1),
        GROUP=Hq // Hkv, GROUP_PAD=max(16, triton.next_power_of_2(Hq // Hkv)), HEAD_DIM=D, BLOCK_SIZE=block_size,
        TILE=plan.tile, NB=plan.tile_blocks.shape[1], IEEE=q.dtype == torch.float32, KV_FP8=kv_fp8, K_WORDS=kv_fp8, V_WORDS=kv_fp8,
        ASM=q.device.type == "cuda", num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}),
    )
    _flat_combine[(B, Hq)](plan.part_o, plan.part_lse, out, plan.share_total, plan.row_tiles,
                           out.stride(0), out.stride(1), Hq, HEAD_DIM=D, num_warps=1)
    return out
