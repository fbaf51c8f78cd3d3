"""Decode attention over the paged KV cache: one new query token per sequence.

One program per (sequence, KV head, split) handles that head's whole group of query heads
(grouped-query attention), walking its share of the sequence's context in tiles of TILE
tokens that may span several KV blocks, with an online softmax. Context lengths are read
on the device, so one launch (and one CUDA graph) serves any mix of lengths; a sequence
of length 0 (a padding row of a captured graph) gets zeros.

The GPU starts programs in the order of their grid index. By default that is by KV head,
then row; with `rows_outer`, row by row, each row's heads and splits together, so that rows
sorted by context, longest first (KernelConfig.decode_order "longest-first"), start the
longest work first across every head and the kernel does not end on one long program while
the other SMs idle.

Split-K (flash-decoding): when the batch gives fewer (sequence, KV head) programs than
the GPU has SMs, each sequence's context is split over SPLITS programs that run side by
side; each writes its normalized partial output and log-sum-exp, and a second kernel
combines them. Without it, at batch 1, one program per head walked its tiles one after
another, far slower than the layer's KV can be read (BENCHMARKS.md, decode latency,
run 5)."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from worker.embedded.kernels.kv_tile import FP8_READS, cache_view, dot_query, kv_tile
from worker.embedded.kernels.pdl import enter, launch_options, pdl_on
from worker.engine_api import KernelConfig


# How this kernel may read an FP8 cache: kv_tile.py's two reads, and two experiments for
# bench.paged_decode_tune (not the engine's): "dot", the query quantized to E4M3 per head and
# the K tile straight into a float8 dot, V read as words (on an H200 no faster than the words
# read: BENCHMARKS.md, FP8 and INT8 on the GPU, run 17); and "bits", words widened by integer
# shifts and masks instead of cvt instructions, the factor of 256 that leaves folded into the
# softmax scale and the output's; and "kcast", K loaded as float8 and widened by Triton's own
# cast on its way into the QK^T dot, V read as words. On sm_90 Triton then keeps the K tile in
# shared memory as bytes and widens it in the dot's registers, where the words read stores it
# again as float16 (bench.kernel_ir: a quarter less shared-memory traffic a tile); the
# same output as the words read's, bit for bit.
DECODE_FP8_READS = (*FP8_READS, "dot", "bits", "kcast")


@triton.jit
def _paged_decode(
    Q, K, V, O, PART_O, PART_LSE, TABLES, CTX_LENS, scale, v_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_oh,
    stride_tb,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr, SPLITS: tl.constexpr, USE_GDC: tl.constexpr,
    KV_FP8: tl.constexpr, K_WORDS: tl.constexpr, V_WORDS: tl.constexpr, ASM: tl.constexpr, FP8_DOT: tl.constexpr,
    FP8_BITS: tl.constexpr, ROWS_OUTER: tl.constexpr,
):
    enter(USE_GDC)
    if ROWS_OUTER:  # grid (Hkv * SPLITS, B): a row's programs start together, rows in order
        kvh = tl.program_id(0) // SPLITS
        split = tl.program_id(0) % SPLITS
        b = tl.program_id(1)
        num_kv = tl.num_programs(0) // SPLITS
    else:  # grid (B, Hkv, SPLITS): programs start by KV head, then row
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        num_kv = tl.num_programs(1)
    # int32 index math whatever the lengths' dtype (64-bit token offsets were 10-43% slower, run 15)
    ctx = tl.load(CTX_LENS + b).to(tl.int32)
    per_split = tl.cdiv(tl.cdiv(ctx, TILE), SPLITS) * TILE
    lo = split * per_split
    hi = tl.minimum(ctx, lo + per_split)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    t = tl.arange(0, TILE)
    g_ok = g < GROUP
    heads = kvh * GROUP + g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
    if FP8_DOT:
        # QK^T on float8 operands: each query head quantized to E4M3 with a scale of its own,
        # which joins the softmax scale; K goes to the dot as stored (V is read as words)
        qf = q.to(tl.float32)
        q_amax = tl.max(tl.abs(qf), 1)
        q_scale = tl.where(q_amax > 0, q_amax / 448.0, 1.0)
        q8 = (qf / q_scale[:, None]).to(tl.float8e4nv)
        row_scale = scale * q_scale
    q = dot_query(q, KV_FP8, K_WORDS or V_WORDS, IEEE)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for start in range(lo, hi, TILE):
        tok = start + t
        t_ok = tok < ctx
        # int64: a cache of more than 2**31 elements a layer (a small model's, FP8) is possible
        blocks = tl.load(TABLES + b * stride_tb + tok // BLOCK_SIZE, mask=t_ok, other=0).to(tl.int64)
        offset = tok % BLOCK_SIZE
        if FP8_DOT:
            k8 = kv_tile(K, blocks * stride_kb + offset * stride_kt + kvh * stride_kh, t_ok, HEAD_DIM, TILE, KV_FP8,
                         K_WORDS, ASM)  # the float8 tile as stored (K_WORDS is off for this read)
            s = tl.dot(q8, tl.trans(k8)) * row_scale[:, None]
        else:
            k = kv_tile(K, blocks * stride_kb + offset * stride_kt + kvh * stride_kh, t_ok, HEAD_DIM, TILE, KV_FP8,
                        K_WORDS, ASM, FP8_BITS).to(q.dtype)
            if IEEE:  # float32 models keep float32 products (no tf32)
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # [GROUP_PAD, TILE]
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = kv_tile(V, blocks * stride_vb + offset * stride_vt + kvh * stride_vh, t_ok, HEAD_DIM, TILE, KV_FP8,
                    V_WORDS, ASM, FP8_BITS).to(q.dtype)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m = m_new
    empty = l == 0.0
    out = acc / tl.where(empty, 1.0, l)[:, None]
    if KV_FP8:  # an FP8 cache holds values / v_scale (the split combine is linear: partials too)
        out = out * v_scale
    if SPLITS == 1:
        tl.store(O + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty), mask=g_ok[:, None])
    else:  # partials: [B, Hq, SPLITS, D] and [B, Hq, SPLITS], contiguous
        row = (b * (num_kv * GROUP) + heads) * SPLITS + split
        tl.store(PART_O + row[:, None] * HEAD_DIM + d[None, :], out, mask=g_ok[:, None])
        lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, l)))
        tl.store(PART_LSE + row, lse, mask=g_ok)


@triton.jit
def _combine_splits(PART_O, PART_LSE, O, stride_ob, stride_oh, Hq,
                    SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, USE_GDC: tl.constexpr):
    enter(USE_GDC)
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, SPLITS)
    d = tl.arange(0, HEAD_DIM)
    row = (b * Hq + h) * SPLITS + sp
    lse = tl.load(PART_LSE + row)
    top = tl.max(lse, 0)
    w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - tl.where(top == float("-inf"), 0.0, top)))
    o = tl.load(PART_O + row[:, None] * HEAD_DIM + d[None, :])
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(O + b * stride_ob + h * stride_oh + d, out.to(O.dtype.element_ty))


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32
    scale: float,
    out: torch.Tensor | None = None,
    splits: int | None = None,  # None: as many as fill the GPU's SMs (a power of two)
    pdl: bool = KernelConfig.pdl,
    v_scale: float = 1.0,  # the cache holds values / v_scale (kv_cache.dtype fp8); fold k's into `scale`
    tile: int | None = None,  # tokens a loop iteration (None: wide_tile's choice, or the block size if larger)
    num_warps: int = 4,
    num_stages: int | None = None,  # None: 2 over an FP8 cache, else Triton's default (3)
    fp8_read: str = "words",  # how an FP8 cache is read: DECODE_FP8_READS
    max_regs: int | None = None,  # a cap on registers a thread (Triton's maxnreg), for bench.paged_decode_tune
    rows_outer: bool = False,  # programs start row by row, each row's KV heads (and splits) together (KernelConfig.decode_order)
) -> torch.Tensor:
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    group = Hq // Hkv
    out = torch.empty_like(q) if out is None else out
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn  # by the cache, not the scales: one variant per cache
    auto_tile = not tile
    tile = tile or (128 if kv_fp8 else 64)
    if num_stages is None and kv_fp8:
        num_stages = 2  # 1-3% faster than 3 in every case measured (BENCHMARKS.md, FP8 KV cache reads)
    if splits is None:
        splits = num_splits(B * Hkv, _num_sms(q.device), block_tables.shape[1] * block_size, tile)
    if auto_tile:
        tile = max(wide_tile(kv_fp8, splits, D), block_size)
    part_o = part_lse = out  # unused when there is one split
    use_pdl = pdl_on(q.device, B, pdl)
    if splits > 1:
        part_o = torch.empty((B, Hq, splits, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
    if fp8_read not in DECODE_FP8_READS:
        raise ValueError(f"fp8_read must be one of {DECODE_FP8_READS}, not {fp8_read!r}")
    fp8_dot = kv_fp8 and fp8_read == "dot"
    fp8_bits = kv_fp8 and fp8_read == "bits"
    if fp8_bits:  # the tiles come back divided by 256
        scale, v_scale = scale * 256.0, v_scale * 256.0
    k_read, v_read = tile_reads(fp8_read)
    k_cache, v_cache = cache_view(k_cache, k_read), cache_view(v_cache, v_read)
    grid = (Hkv * splits, B) if rows_outer else (B, Hkv, splits)
    _paged_decode[grid](
        q, k_cache, v_cache, out, part_o, part_lse, block_tables, context_lens, scale, v_scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=D,
        BLOCK_SIZE=block_size, TILE=tile, IEEE=q.dtype == torch.float32, SPLITS=splits, USE_GDC=use_pdl,
        KV_FP8=kv_fp8, K_WORDS=k_read == "words", V_WORDS=v_read == "words", ASM=q.device.type == "cuda",
        FP8_DOT=fp8_dot, FP8_BITS=fp8_bits, ROWS_OUTER=rows_outer,
        num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}), **launch_options(use_pdl),
        **({} if max_regs is None else {"maxnreg": max_regs}),
    )
    if splits > 1:
        _combine_splits[(B, Hq)](part_o, part_lse, out, out.stride(0), out.stride(1), Hq, SPLITS=splits, HEAD_DIM=D,
                                 USE_GDC=use_pdl, num_warps=1, **launch_options(use_pdl))
    return out


def tile_reads(fp8_read: str) -> tuple[str, str]:
    """kv_tile.py's read (words or cast) for the K tiles and for the V tiles under each of
    DECODE_FP8_READS: the kernel's flags and the cache views both follow from it."""
    return {"dot": ("cast", "words"), "bits": ("words", "words"), "kcast": ("cast", "words")}.get(
        fp8_read, (fp8_read, fp8_read))


def wide_tile(kv_fp8: bool, splits: int, head_dim: int) -> int:
    """Tokens a loop iteration, measured inside the engine's CUDA graphs:
    - an FP8 cache, 128: at one split, 3-27% faster than 64 on the 8B heads (BENCHMARKS.md,
      FP8 KV cache reads);
    - a 16-bit cache with heads of 128 or more, one split (batches that fill the GPU), 128:
      on the 8B heads a decode's context token cost a graph step 31-35 ns against 36-45
      with 64 (64 and 160 decodes over ~1,024 tokens; 1% slower over ~128, runs 15-16);
    - else 64: on the 1B shape's 64-wide heads 128 cost 9.6-10.7 ns a token against
      5.4-11.4, and split small batches were measured (run 5) with 64."""
    if kv_fp8 or (splits == 1 and head_dim >= 128):
        return 128
    return 64


def num_splits(programs: int, sms: int, max_context: int, tile: int) -> int:
    """Splits per sequence: enough programs to cover the SMs, no more than the longest
    possible context has tiles, a power of two, at most 32."""
    if programs >= sms:
        return 1
    want = min(32, -(-sms // programs), -(-max_context // tile))
    return 1 << max(0, (want - 1).bit_length()) if want > 1 else 1


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # Triton's CPU interpreter (tests): small, so the split path runs there too
    return torch.cuda.get_device_properties(device).multi_processor_count


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
