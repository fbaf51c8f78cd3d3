"""Skinny matmul for decode: y = x @ W.T with few rows in x (batch <= 16), bfloat16 or
float16, reading W once. At batch 1 cuBLAS took about twice the bandwidth floor's time
on Llama-3.2-1B's qkv and o_proj (BENCHMARKS.md, kernel choices, 'skinny matmul'). One
program per BLOCK_N output columns streams its rows of W in BLOCK_K steps; x is padded
to 16 rows in registers so the products run on tensor cores. Float32 accumulation, no
split-K (an atomic reduction would cost two more launches).

One row (batch-1 decode) runs gemv_fma instead by default (KernelConfig.one_row_matmul):
the weight loaded straight into registers and multiplied on the CUDA cores, with no shared
memory and no padding. It was faster than the tensor-core kernel on every projection
measured (BENCHMARKS.md, run 22). It takes 2-4 rows too (KernelConfig.fma_max_rows, 1 by
default: whole two-token steps were no faster, run 23; fma_faster says where). The vocabulary's
lm_head keeps this kernel: it already ran at its floor, and it was not measured on the
CUDA cores.

On Hopper the kernel is launched with programmatic dependent launch (pdl.py) and pulls
the first `prefetch_bytes` of its weight (KernelConfig.l2_prefetch_bytes) towards L2
while the kernel before it finishes.

Tried and measured slower: folding the RMSNorm into this kernel (gain and 1/rms applied
to x inside the K loop) slowed each call by more than the norm launches it saved;
elementwise work on a dot operand in the loop seems to cost the loop its pipelining, as
SiLU fused into the down projection did (BENCHMARKS.md, decode latency, run 6). Split-K
with the next kernel adding the partials was slower at 2 and 4 shares on Llama-3.2-1B at
batch 1, and merely giving this loop bounds computed at run time (a share's start and end)
cost the unsplit kernel 15% (run 17). In gemv_fma too (run 25): the norm's gain folded
into the weight at load and 1/rms summed from the x the loop reads anyway, the residual
added in place, and the rotary and cache write in qkv_proj's epilogue made the 1B's and the
8B's one-token steps slower than the norm and rotary kernels they replaced."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.embedded.kernels.fused import silu_times
from worker.embedded.kernels.pdl import enter, launch_options, pdl_on
from worker.engine_api import FMA_MAX_ROWS, KernelConfig

MAX_ROWS = 16  # x is padded to this many rows: tl.dot needs at least 16
ACC_2D_MAX = 8192  # float32 sums a gemv_fma program keeps over its rows at 2-4 rows: 64 registers a thread at 4 warps


@triton.jit
def _prefetch_l2(ptrs):
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _gemv(X, W, B, Y, M, N, K, stride_xm, stride_wn, stride_ym,
          HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
          USE_GDC: tl.constexpr, PREFETCH_K: tl.constexpr, GATED: tl.constexpr):
    pid = tl.program_id(0)
    m = tl.arange(0, 16)  # MAX_ROWS
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    m_ok = m < M
    n_ok = n < N
    up = n + N  # GATED: W is [gate; up], 2N rows, and this program reads both halves' rows n
    if PREFETCH_K > 0:
        # Weights never depend on earlier kernels: pull this program's first PREFETCH_K
        # columns towards L2 while the kernel before finishes (one address per 128-byte
        # line of 16-bit values).
        lines = tl.arange(0, PREFETCH_K // 64) * 64
        _prefetch_l2(W + tl.minimum(n, N - 1)[:, None] * stride_wn + lines[None, :])
        if GATED:
            _prefetch_l2(W + tl.minimum(up, 2 * N - 1)[:, None] * stride_wn + lines[None, :])
    enter(USE_GDC)
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    acc_up = tl.zeros([16, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        x_ok = m_ok[:, None] if EVEN_K else m_ok[:, None] & (k < K)[None, :]
        w_ok = n_ok[:, None] if EVEN_K else n_ok[:, None] & (k < K)[None, :]
        x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=x_ok, other=0.0)
        w = tl.load(W + n[:, None] * stride_wn + k[None, :], mask=w_ok, other=0.0)
        acc += tl.dot(x, tl.trans(w))
        if GATED:
            wu = tl.load(W + up[:, None] * stride_wn + k[None, :], mask=w_ok, other=0.0)
            acc_up += tl.dot(x, tl.trans(wu))
    if HAS_BIAS:
        acc += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = acc.to(Y.dtype.element_ty)
    if GATED:  # each projection rounded to the output dtype first, as the unfused pair rounds
        y = silu_times(y, acc_up.to(Y.dtype.element_ty))
    tl.store(Y + m[:, None] * stride_ym + n[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, block_n: int = 16, block_k: int = 256,
         num_warps: int = 4, num_stages: int = 4, pdl: bool = KernelConfig.pdl,
         prefetch_bytes: int = KernelConfig.l2_prefetch_bytes, gated: bool = False) -> torch.Tensor:
    """x [M, K] (M <= 16, last dim contiguous) @ w[N, K].T (+ bias) -> [M, N]. With PDL,
    up to `prefetch_bytes` of w (the leading columns of its rows) are pulled towards L2
    before the previous kernel ends.

    gated: w is a fused [gate; up] projection of 2N rows (no bias) and the result is
    SiLU(x @ gate.T) * (x @ up.T), [M, N], rounded exactly as silu_and_mul(gemv(x, w))
    rounds, in one launch: each program reads rows n of both halves."""
    M, K = x.shape
    N = w.shape[0] // 2 if gated else w.shape[0]
    if gated and (bias is not None or w.shape[0] % 2):
        raise ValueError("a gated gemv takes an even number of weight rows and no bias")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    use_pdl = pdl_on(x.device, M, pdl)
    _gemv[(triton.cdiv(N, block_n),)](
        x, w, w if bias is None else bias, y, M, N, K, x.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0,
        USE_GDC=use_pdl, PREFETCH_K=prefetch_columns(w.shape[0], K, w, prefetch_bytes) if use_pdl else 0, GATED=gated,
        num_warps=num_warps, num_stages=num_stages, **launch_options(use_pdl),
    )
    return y


def prefetch_columns(n: int, k: int, w: torch.Tensor, budget_bytes: int) -> int:
    """The most columns, a power of two of at least one 128-byte line (64 16-bit values)
    and at most K, whose N rows fit in `budget_bytes`: L2 is 50 MB on an H100, a prefetch
    must not evict itself, and a large one competes with the previous kernel's own reads
    (BENCHMARKS.md, kernel choices, 'L2 prefetch').
    0 (none) for other dtypes or a budget under one line a row."""
    cols = budget_bytes // (n * 2)
    if w.element_size() != 2 or min(cols, k) < 64:
        return 0
    return 1 << (min(cols, k).bit_length() - 1)


def gemv_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(block_n, block_k, warps, stages): the best measured on an H100 with cold L2 for
    each kind of projection (bench/gemv_tune.py, docs/gpu-results/run5/gemv_tune.json); the
    vocabulary and the 8B gate_up on an H200 (run 18, where both beat cuBLAS by 3-8%)."""
    if n >= 32768:  # lm_head
        return 64, 256, 4, 3
    if n >= 8192:  # gate_up
        return 64, 128, 4, 3
    if k >= 8192:  # down
        return (16, 512, 4, 5) if n <= 2048 else (32, 512, 4, 3)
    if k <= 1024:  # small models
        return 32, 128, 4, 5
    return (16, 512, 4, 5) if n <= 2048 else (32, 256, 4, 5)


def gemv_gated_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(block_n, block_k, warps, stages) of the gated kernel, n the output columns (the
    intermediate size): each program reads block_n rows of gate and of up. The best on an
    H200 for the 1B and 8B shapes (run 18); elsewhere half the plain kernel's block_n."""
    if n >= 4096:
        return 32, 256, 4, 3
    bn, bk, nw, ns = gemv_config(2 * n, k)
    return max(16, bn // 2), bk, nw, ns


# The gated kernel for fused gate_up projections up to this many elements: in the batch-1
# decode graph on an H200 it made Llama-3.2-1B's step (33.6M) 2.6% faster than the plain
# kernel and the SiLU kernel after it, and Llama-3-8B's (117M) 6% slower (run 18).
GATED_UP_TO_ELEMENTS = 64 * 2**20


def gated_faster(n: int, k: int) -> bool:
    """Whether a fused [gate; up] weight of [n, k] runs the gated kernel."""
    return n * k <= GATED_UP_TO_ELEMENTS


@triton.jit
def _x_row(X, r: tl.constexpr, stride_xm, k, K, EVEN_K: tl.constexpr):
    """Row r of x at columns k, as float32 [1, BLOCK_K]."""
    if EVEN_K:
        x = tl.load(X + r * stride_xm + k)
    else:
        x = tl.load(X + r * stride_xm + k, mask=k < K, other=0.0)
    return x.to(tl.float32)[None, :]


@triton.jit
def _fma_tile(acc, wf, x, ACC_2D: tl.constexpr):
    """acc plus a float32 weight tile wf [BLOCK_N, BLOCK_K] times one row x [1, BLOCK_K]:
    acc [BLOCK_N], or ACC_2D [BLOCK_N, BLOCK_K] (reduced once, at the end)."""
    p = wf * x
    if ACC_2D:
        acc += p
    else:
        acc += tl.sum(p, axis=1)
    return acc


@triton.jit
def _fma_row(acc, up, wf, wuf, x, GATED: tl.constexpr, ACC_2D: tl.constexpr):
    """One row's sums (and its up half's, GATED) plus the weight tiles times its x."""
    acc = _fma_tile(acc, wf, x, ACC_2D)
    if GATED:
        up = _fma_tile(up, wuf, x, ACC_2D)
    return acc, up


@triton.jit
def _fma_store(acc, acc_up, r: tl.constexpr, SX, SW, B, Y, n, n_ok, rows, stride_ym,
               HAS_SX: tl.constexpr, HAS_SW: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
               ACC_2D: tl.constexpr):
    """Row r of y from its sums: scales, bias, and SiLU(gate) * up when GATED."""
    out = tl.sum(acc, axis=1) if ACC_2D else acc
    if HAS_SW:
        out = out * tl.load(SW + rows)
    if HAS_SX:
        out = out * tl.load(SX + r)
    if HAS_BIAS:
        out += tl.load(B + rows).to(tl.float32)
    y = out.to(Y.dtype.element_ty)
    if GATED:
        up = tl.sum(acc_up, axis=1) if ACC_2D else acc_up
        y = silu_times(y, up.to(Y.dtype.element_ty))
    tl.store(Y + r * stride_ym + n, y, mask=n_ok)


@triton.jit
def _gemv_fma(X, SX, W, SW, B, Y, N, K, stride_xm, stride_wn, stride_ym,
              HAS_SX: tl.constexpr, HAS_SW: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
              ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
              USE_GDC: tl.constexpr, PREFETCH_K: tl.constexpr, LINE: tl.constexpr, ACC_2D: tl.constexpr,
              UNROLL: tl.constexpr):
    """ROWS rows of x (1 to 4, exactly M) times W on the CUDA cores: each weight tile loaded
    straight into registers, converted to float32 once and multiplied by every row, with no
    shared memory staging and no tensor cores (the tl.dot kernels stage every weight byte
    through shared memory and pad x to 16 rows). Each row has sums of its own: ACC_2D keeps
    a [BLOCK_N, BLOCK_K] float32 sum and reduces it once at the end; else each tile is
    reduced across threads as it is read. UNROLL: K steps unrolled (Triton does not
    pipeline these loads: unrolling is how a program keeps more of them in flight). GATED:
    W is [gate; up] (2N rows) and y = SiLU(gate) * up, each rounded to y's dtype first, as
    _gemv's gated form."""
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    rows = tl.minimum(n, N - 1)  # rows past N read row N - 1 and are not stored
    kk = tl.arange(0, BLOCK_K)
    if PREFETCH_K > 0:
        lines = (tl.arange(0, PREFETCH_K // LINE) * LINE)[None, :]
        _prefetch_l2(W + rows[:, None] * stride_wn + lines)
        if GATED:
            _prefetch_l2(W + (rows + N)[:, None] * stride_wn + lines)
    enter(USE_GDC)
    if ACC_2D:
        acc0 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    else:
        acc0 = tl.zeros([BLOCK_N], tl.float32)
    up0 = tl.zeros_like(acc0)  # the up half's sums (GATED), per row as acc
    if ROWS >= 2:
        acc1 = tl.zeros_like(acc0)
        up1 = tl.zeros_like(acc0)
    if ROWS >= 3:
        acc2 = tl.zeros_like(acc0)
        up2 = tl.zeros_like(acc0)
    if ROWS >= 4:
        acc3 = tl.zeros_like(acc0)
        up3 = tl.zeros_like(acc0)
    for k0 in tl.range(0, K, BLOCK_K, loop_unroll_factor=UNROLL):
        k = k0 + kk
        x = _x_row(X, 0, stride_xm, k, K, EVEN_K)
        if EVEN_K:
            w = tl.load(W + rows[:, None] * stride_wn + k[None, :])
        else:
            w = tl.load(W + rows[:, None] * stride_wn + k[None, :], mask=(k < K)[None, :], other=0.0)
        wf = w.to(tl.float32)
        wuf = wf  # the up half's tile (GATED)
        if GATED:
            if EVEN_K:
                wu = tl.load(W + (rows + N)[:, None] * stride_wn + k[None, :])
            else:
                wu = tl.load(W + (rows + N)[:, None] * stride_wn + k[None, :], mask=(k < K)[None, :], other=0.0)
            wuf = wu.to(tl.float32)
        acc0, up0 = _fma_row(acc0, up0, wf, wuf, x, GATED, ACC_2D)
        if ROWS >= 2:
            acc1, up1 = _fma_row(acc1, up1, wf, wuf, _x_row(X, 1, stride_xm, k, K, EVEN_K), GATED, ACC_2D)
        if ROWS >= 3:
            acc2, up2 = _fma_row(acc2, up2, wf, wuf, _x_row(X, 2, stride_xm, k, K, EVEN_K), GATED, ACC_2D)
        if ROWS >= 4:
            acc3, up3 = _fma_row(acc3, up3, wf, wuf, _x_row(X, 3, stride_xm, k, K, EVEN_K), GATED, ACC_2D)
    _fma_store(acc0, up0, 0, SX, SW, B, Y, n, n_ok, rows, stride_ym, HAS_SX, HAS_SW, HAS_BIAS, GATED, ACC_2D)
    if ROWS >= 2:
        _fma_store(acc1, up1, 1, SX, SW, B, Y, n, n_ok, rows, stride_ym, HAS_SX, HAS_SW, HAS_BIAS, GATED, ACC_2D)
    if ROWS >= 3:
        _fma_store(acc2, up2, 2, SX, SW, B, Y, n, n_ok, rows, stride_ym, HAS_SX, HAS_SW, HAS_BIAS, GATED, ACC_2D)
    if ROWS >= 4:
        _fma_store(acc3, up3, 3, SX, SW, B, Y, n, n_ok, rows, stride_ym, HAS_SX, HAS_SW, HAS_BIAS, GATED, ACC_2D)


def gemv_fma(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
             x_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, block_n: int = 16,
             block_k: int = 512, num_warps: int = 4, unroll: int = 1, acc_2d: bool = False, gated: bool = False,
             pdl: bool = KernelConfig.pdl, prefetch_bytes: int = KernelConfig.l2_prefetch_bytes) -> torch.Tensor:
    """x [M, K] (M <= FMA_MAX_ROWS) @ (w [N, K] (* w_scale[N, None])).T (+ bias) -> [M, N] on
    the CUDA cores (_gemv_fma). w 16- or 8-bit; x 16-bit, or 8-bit standing for x * x_scale
    [M, 1] (quantize_rows), or float32. Output in `out_dtype` (default x's dtype, or bfloat16
    for 8-bit x). gated: as gemv's (w a 16-bit [gate; up] of 2N rows, no scales or bias).
    acc_2d: each row keeps a [block_n, block_k] sum (registers grow with the rows)."""
    M, K = x.shape
    if not 1 <= M <= FMA_MAX_ROWS:
        raise ValueError(f"gemv_fma takes 1 to {FMA_MAX_ROWS} rows of x, got {M}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x_scale is not None:
        x_scale = x_scale.contiguous()  # read as x_scale[r]
    N = w.shape[0] // 2 if gated else w.shape[0]
    if gated and (bias is not None or w_scale is not None or w.shape[0] % 2):
        raise ValueError("a gated gemv_fma takes an even number of weight rows, no scale and no bias")
    y = torch.empty((M, N), dtype=out_dtype or (torch.bfloat16 if x.element_size() == 1 else x.dtype), device=x.device)
    use_pdl = pdl_on(x.device, M, pdl)
    line = 128 // w.element_size()
    cols = prefetch_bytes // (w.shape[0] * w.element_size())
    prefetch_k = 0 if not use_pdl or min(cols, K) < line else 1 << (min(cols, K).bit_length() - 1)
    _gemv_fma[(triton.cdiv(N, block_n),)](
        x, x if x_scale is None else x_scale, w, x if w_scale is None else w_scale, x if bias is None else bias, y,
        N, K, x.stride(0), w.stride(0), y.stride(0),
        HAS_SX=x_scale is not None, HAS_SW=w_scale is not None, HAS_BIAS=bias is not None,
        GATED=gated, ROWS=M, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0,
        USE_GDC=use_pdl, PREFETCH_K=prefetch_k, LINE=line, ACC_2D=acc_2d, UNROLL=unroll, num_warps=num_warps,
        num_stages=1, **launch_options(use_pdl),
    )
    return y


def gemv_fma_config(n: int, k: int, w_bytes: int, gated: bool = False, rows: int = 1) -> tuple[int, int, int, int, bool]:
    """(block_n, block_k, warps, unroll, acc_2d) of gemv_fma for a weight of [n, k] with
    `w_bytes` an element (gated: n output columns from 2n rows of [gate; up]): the best of
    bench/gemv_fma.py's sweeps at one row on an H200 for each kind of projection of
    Llama-3.2-1B and Llama-3-8B (BENCHMARKS.md, run 22). Four warps throughout; the tiles
    differ by up to 1.5x between shapes. Two rows (16-bit, not gated: fma_faster): the
    tiles best or within 2% of the best on every such projection at 2 rows (run 23). Else
    the one-row tiles, each row's sums 2-D only while all rows' fit in registers
    (ACC_2D_MAX)."""
    if rows == 2 and w_bytes == 2 and not gated:
        return (2, 1024, 4, 1, True) if n >= 16384 else (4, 1024, 4, 2, True)
    bn, bk, nw, unroll, acc_2d = _one_row_config(n, k, w_bytes, gated)
    return bn, bk, nw, unroll, acc_2d and acc_2d_fits(bn, bk, rows, gated)


def acc_2d_fits(block_n: int, block_k: int, rows: int, gated: bool) -> bool:
    """Whether gemv_fma's 2-D sums (acc_2d) are offered at these tiles: always at one row
    (the one-row sweeps chose them where they won), above it while every row's sums (and
    their up halves', gated) stay within ACC_2D_MAX floats."""
    return rows == 1 or block_n * block_k * rows * (2 if gated else 1) <= ACC_2D_MAX


def _one_row_config(n: int, k: int, w_bytes: int, gated: bool) -> tuple[int, int, int, int, bool]:
    if gated:  # 16-bit; each program reads block_n rows of gate and of up
        return (2, 1024, 4, 1, False) if n * k >= 8 * 2**20 else (4, 1024, 4, 4, True)
    if w_bytes == 2:
        if n >= 16384 or n > k:  # gate_up (not gated), qkv
            return 4, 1024, 4, 4, True
        return (8 if n <= 2048 else 16), 1024, 4, 2, True  # o, down
    if n >= 16384:  # gate_up
        return 8, 2048, 4, 1, False
    return (8, 512, 4, 2, True) if n > 4096 else (8, 1024, 4, 2, True)  # qkv; o, down


def fma_faster(kernels: KernelConfig, rows: int, n: int, eight_bit: bool = False, gated: bool = False) -> bool:
    """Whether `rows` rows of a projection of n output columns run gemv_fma, given
    KernelConfig.one_row_matmul and fma_max_rows: never a vocabulary's lm_head
    (n >= 32768), which runs at its floor with the dot already; above one row only 16-bit
    weights that are not a fused gate_up. At 2 rows, alone, gemv_fma took 0.75-0.98x the
    dot's time on those and 0.98-1.5x on the others (FP8 against the dot with its
    quantization kernel), and at 4 rows 1.1-2.1x on every projection (BENCHMARKS.md, run 23).
    Inside the step the dot did better than alone, and the 8B's (unfused) gate_up is faster
    on the dot, hence fma_max_rows 1."""
    if kernels.one_row_matmul != "fma" or n >= 32768 or not 1 <= rows <= min(kernels.fma_max_rows, FMA_MAX_ROWS):
        return False
    return rows == 1 or not (eight_bit or gated)


def fma_projection(x: torch.Tensor, w: torch.Tensor, kernels: KernelConfig, w_scale: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
    """gemv_fma as the engine launches it (call where fma_faster): its tiles from
    gemv_fma_config, PDL and the L2 prefetch from `kernels`."""
    n = w.shape[0] // 2 if gated else w.shape[0]
    bn, bk, nw, unroll, acc_2d = gemv_fma_config(n, w.shape[1], w.element_size(), gated=gated, rows=x.shape[0])
    return gemv_fma(x, w, w_scale, bias, block_n=bn, block_k=bk, num_warps=nw, unroll=unroll, acc_2d=acc_2d, gated=gated,
                    pdl=kernels.pdl, prefetch_bytes=kernels.l2_prefetch_bytes)
