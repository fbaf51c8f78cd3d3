"""Skinny matmul for decode: y = x @ W.T with few rows in x (batch <= 16), bfloat16 or
float16, reading W once. cuBLAS spent 6.6 us on an H100 on each of Llama-3.2-1B's
qkv (12.6 MB) and o_proj (8.4 MB) at batch 1, about half of the bandwidth floor. One
program per BLOCK_N output columns streams its rows of W in BLOCK_K steps; x is padded
to 16 rows in registers so the products run on tensor cores. Float32 accumulation, no
split-K (an atomic reduction would cost two more launches).

On Hopper the kernel is launched with programmatic dependent launch (pdl.py) and pulls
the first PREFETCH_BYTES of its weight towards L2 while the kernel before it finishes.

Tried and measured slower (docs/gpu-run-6.md): folding the RMSNorm into this kernel
(gain and 1/rms applied to x inside the K loop) made each call ~3-6 us slower, more
than the 33 norm launches it saved; elementwise work on a dot operand in the loop
seems to cost the loop its pipelining, as SiLU fused into the down projection did."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.embedded.kernels import pdl
from worker.embedded.kernels.pdl import enter

MAX_ROWS = 16  # x is padded to this many rows: tl.dot needs at least 16


@triton.jit
def _prefetch_l2(ptrs):
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _gemv(X, W, B, Y, M, N, K, stride_xm, stride_wn, stride_ym,
          HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
          USE_GDC: tl.constexpr, PREFETCH_K: tl.constexpr):
    pid = tl.program_id(0)
    m = tl.arange(0, 16)  # MAX_ROWS
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    m_ok = m < M
    n_ok = n < N
    if PREFETCH_K > 0:
        # Weights never depend on earlier kernels: pull this program's first PREFETCH_K
        # columns towards L2 while the kernel before finishes (one address per 128-byte
        # line of 16-bit values).
        lines = tl.arange(0, PREFETCH_K // 64) * 64
        _prefetch_l2(W + tl.minimum(n, N - 1)[:, None] * stride_wn + lines[None, :])
    enter(USE_GDC)
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        x_ok = m_ok[:, None] if EVEN_K else m_ok[:, None] & (k < K)[None, :]
        w_ok = n_ok[:, None] if EVEN_K else n_ok[:, None] & (k < K)[None, :]
        x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=x_ok, other=0.0)
        w = tl.load(W + n[:, None] * stride_wn + k[None, :], mask=w_ok, other=0.0)
        acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + m[:, None] * stride_ym + n[None, :], acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, block_n: int = 16, block_k: int = 256,
         num_warps: int = 4, num_stages: int = 4) -> torch.Tensor:
    """x [M, K] (M <= 16, last dim contiguous) @ w[N, K].T (+ bias) -> [M, N]."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    use_pdl = pdl.on(x.device, M)
    _gemv[(triton.cdiv(N, block_n),)](
        x, w, w if bias is None else bias, y, M, N, K, x.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0,
        USE_GDC=use_pdl, PREFETCH_K=prefetch_columns(N, K, w) if use_pdl else 0,
        num_warps=num_warps, num_stages=num_stages, **pdl.launch_options(use_pdl),
    )
    return y


# Of each weight, pulled towards L2 before the previous kernel ends (0: none). On an H100
# (Llama-3.2-1B, batch 1) 4 MB beat 16 MB and none (docs/gpu-run-6.md).
PREFETCH_BYTES = 4 * 2**20


def prefetch_columns(n: int, k: int, w: torch.Tensor) -> int:
    """The most columns, a power of two of at least one 128-byte line (64 16-bit values)
    and at most K, whose N rows fit in PREFETCH_BYTES: L2 is 50 MB on an H100, and a
    prefetch must not evict itself. 0 (none) for other dtypes."""
    cols = PREFETCH_BYTES // (n * 2)
    if w.element_size() != 2 or min(cols, k) < 64:
        return 0
    return 1 << (min(cols, k).bit_length() - 1)


def gemv_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(block_n, block_k, warps, stages): the best measured on an H100 with cold L2 for
    each kind of projection (bench/gemv_tune.py, docs/gpu-results/run5/gemv_tune.json)."""
    if n >= 8192:  # gate_up
        return 64, 128, 4, 3
    if k >= 8192:  # down
        return (16, 512, 4, 5) if n <= 2048 else (32, 512, 4, 3)
    if k <= 1024:  # small models
        return 32, 128, 4, 5
    return (16, 512, 4, 5) if n <= 2048 else (32, 256, 4, 5)
