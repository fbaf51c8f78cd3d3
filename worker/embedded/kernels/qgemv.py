"""Quantized projections' kernels: per-token activation quantization, and the skinny
matmul (at most 16 rows) over 8-bit weights with per-output-channel scales.

`quantize_rows` scales each row of x by its amax (to 448 for float8 E4M3, to 127 for
int8) in one program per row, and writes the 8-bit row and its float32 scale: the
activation half of the FP8 and W8A8 matmuls, this kernel's and torch's.

`qgemv` is kernels/gemv.py's loop over an 8-bit weight (half the bytes to stream), in one
of two ways:
- x already quantized (`x_scale` given): an 8-bit tl.dot (float32 accumulation for
  float8, int32 for int8);
- x 16-bit: the weight tile converted to x's dtype before a 16-bit dot (W8A16).
The scales are applied once, in the epilogue.

Tried and measured much slower on an H200 (BENCHMARKS.md, 'FP8 and INT8 projections'):
quantizing x inside this kernel (each program reading its rows' amax first, then scaling
and rounding each x tile before the dot), against the separate quantization kernel plus
the matmul: elementwise work on a dot operand inside the K loop again cost the loop its
pipelining (see gemv.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.embedded.kernels.fused import quantize_row
from worker.embedded.kernels.gemv import _prefetch_l2
from worker.embedded.kernels.pdl import enter, launch_options, pdl_on
from worker.engine_api import KernelConfig

MAX_ROWS = 16


def qmax(dtype: torch.dtype) -> float:
    """The largest magnitude a quantized value of `dtype` takes."""
    return 127.0 if dtype == torch.int8 else torch.finfo(dtype).max


@triton.jit
def _quantize_rows(X, Q, S, K, stride_xm, stride_qm, QMAX: tl.constexpr, IS_INT: tl.constexpr, BLOCK: tl.constexpr,
                   USE_GDC: tl.constexpr):
    enter(USE_GDC)
    row = tl.program_id(0)
    k = tl.arange(0, BLOCK)
    x = tl.load(X + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
    q, scale = quantize_row(x, QMAX, IS_INT)
    tl.store(Q + row * stride_qm + k, q.to(Q.dtype.element_ty), mask=k < K)
    tl.store(S + row, scale)


def quantize_rows(x: torch.Tensor, dtype: torch.dtype, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (last dim contiguous) -> (q [M, K] of `dtype`, scale [M, 1] float32) with
    x ~= q * scale, each row scaled by its own amax. With `pdl` (the skinny path's
    KernelConfig.pdl) launched as the decode step's other kernels are, so that it does not
    break their chain of early starts (pdl.py)."""
    M, K = x.shape
    q = torch.empty((M, K), dtype=dtype, device=x.device)
    s = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(K)
    use_pdl = pdl_on(x.device, M, pdl)
    _quantize_rows[(M,)](x, q, s, K, x.stride(0), q.stride(0), QMAX=qmax(dtype), IS_INT=dtype == torch.int8,
                         BLOCK=block, USE_GDC=use_pdl, num_warps=max(1, min(16, block // 512)), **launch_options(use_pdl))
    return q, s


@triton.jit
def _tiles(X, W, m, n, k, m_ok, n_ok, K, stride_xm, stride_wn, EVEN_K: tl.constexpr):
    """The x rows m and weight rows n at columns k, masked where they run out (inlined
    into each kernel's K loop)."""
    x_ok = m_ok[:, None] if EVEN_K else m_ok[:, None] & (k < K)[None, :]
    w_ok = n_ok[:, None] if EVEN_K else n_ok[:, None] & (k < K)[None, :]
    x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=x_ok, other=0.0)
    w = tl.load(W + n[:, None] * stride_wn + k[None, :], mask=w_ok, other=0.0)
    return x, w


@triton.jit
def _qgemv(X, SX, W, SW, B, Y, M, N, K, stride_xm, stride_wn, stride_ym,
           X_QUANT: tl.constexpr, INT_ACC: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
           EVEN_K: tl.constexpr, USE_GDC: tl.constexpr, PREFETCH_K: tl.constexpr):
    pid = tl.program_id(0)
    m = tl.arange(0, 16)  # MAX_ROWS
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    m_ok = m < M
    n_ok = n < N
    if PREFETCH_K > 0:  # one address per 128-byte line of 8-bit values
        lines = tl.arange(0, PREFETCH_K // 128) * 128
        _prefetch_l2(W + tl.minimum(n, N - 1)[:, None] * stride_wn + lines[None, :])
    enter(USE_GDC)
    acc = tl.zeros([16, BLOCK_N], tl.int32 if INT_ACC else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x, w = _tiles(X, W, m, n, k0 + kk, m_ok, n_ok, K, stride_xm, stride_wn, EVEN_K)
        if X_QUANT:
            acc += tl.dot(x, tl.trans(w))
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    out = acc.to(tl.float32) * tl.load(SW + n, mask=n_ok, other=0.0)[None, :]
    if X_QUANT:
        out = out * tl.load(SX + m, mask=m_ok, other=0.0)[:, None]
    if HAS_BIAS:
        out += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + m[:, None] * stride_ym + n[None, :], out.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def qgemv(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
          x_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, block_n: int = 32,
          block_k: int = 512, num_warps: int = 4, num_stages: int = 4, pdl: bool = KernelConfig.pdl,
          prefetch_bytes: int = KernelConfig.l2_prefetch_bytes) -> torch.Tensor:
    """x [M, K] (M <= 16, last dim contiguous) @ (w [N, K] * w_scale[N, None]).T (+ bias).
    With `x_scale` [M, 1], x holds 8-bit values of w's dtype standing for x * x_scale
    (quantize_rows); without, x is 16-bit. Output in `out_dtype` (default x's dtype)."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    use_pdl = pdl_on(x.device, M, pdl)
    cols = prefetch_bytes // N
    prefetch_k = 0 if not use_pdl or min(cols, K) < 128 else 1 << (min(cols, K).bit_length() - 1)
    _qgemv[(triton.cdiv(N, block_n),)](
        x, w_scale if x_scale is None else x_scale, w, w_scale, w_scale if bias is None else bias, y, M, N, K,
        x.stride(0), w.stride(0), y.stride(0),
        X_QUANT=x_scale is not None, INT_ACC=x_scale is not None and w.dtype == torch.int8, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=K % block_k == 0, USE_GDC=use_pdl, PREFETCH_K=prefetch_k, num_warps=num_warps, num_stages=num_stages,
        **launch_options(use_pdl),
    )
    return y


def qgemv_config(n: int, k: int, x_bytes: int) -> tuple[int, int, int, int]:
    """(block_n, block_k, warps, stages) for an 8-bit weight of [n, k] and x of `x_bytes`
    an element, as measured on an H200 at one row (bench/quant_kernels.py --sweep,
    BENCHMARKS.md, 'FP8 and INT8 on the GPU', run 19): for 8-bit x where K >= 4096 (each of
    Llama-3-8B's projections), the sweep's best on each: 32 x 512 tiles in 2 stages for
    gate_up-sized weights (n >= 16384), 64 x 512 in 4 for qkv (n above 4096), 32 x 1024 in 4
    for o and down, 5-12% faster than run 3's 32 x 1024 in 3 stages for all; else gemv_config's
    tiles twice as deep (the same bytes a step; Llama-3.2-1B's and SmolLM2's); for 16-bit x
    (W8A16), gemv_config's own (deeper ones measured slower on Llama-3-8B's qkv). Fewer stages
    where the tiles would not fit in shared memory."""
    from worker.embedded.kernels.gemv import gemv_config

    bn, bk, nw, ns = gemv_config(n, k)
    if x_bytes == 1:
        if k >= 4096:
            bn, bk, nw, ns = (32, 512, 4, 2) if n >= 16384 else (64, 512, 4, 4) if n > 4096 else (32, 1024, 4, 4)
        else:
            bk = min(2 * bk, 1024)
    while ns > 2 and (16 * x_bytes + bn) * bk * ns > 200_000:
        ns -= 1
    return bn, bk, nw, ns


@triton.jit
def _w8a16_mm(X, W, SW, B, Y, M, N, K, stride_xm, stride_wn, stride_ym,
              HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              EVEN_K: tl.constexpr):
    # Programs with the same weight columns run next to each other (m is the fast grid
    # axis): the second row tile reads the weight tile from L2, not HBM.
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    m_ok = m < M
    n_ok = n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x, w = _tiles(X, W, m, n, k0 + kk, m_ok, n_ok, K, stride_xm, stride_wn, EVEN_K)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    out = acc * tl.load(SW + n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + m[:, None] * stride_ym + n[None, :], out.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def w8a16_mm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] 16-bit (last dim contiguous) @ (w [N, K] 8-bit * w_scale[N, None]).T (+ bias),
    each weight tile converted to x's dtype in registers: the weight streams from HBM as 8
    bits, with no 16-bit copy of it made. For the row counts between qgemv's (16) and
    compute-bound prompts (quant.W8A16_MM_ROWS): decode batches."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n = 64 if N >= 8192 else 32  # enough programs to fill the SMs on 4,096 columns
    block_k = 128
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _w8a16_mm[grid](x, w, w_scale, w_scale if bias is None else bias, y, M, N, K, x.stride(0), w.stride(0), y.stride(0),
                    HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                    EVEN_K=K % block_k == 0, num_warps=4, num_stages=4)
    return y
