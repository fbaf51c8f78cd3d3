"""Skinny matmul for decode: y = x @ W.T with few rows in x (batch <= 16), bfloat16 or
float16, reading W once. At batch 1 cuBLAS took about twice the bandwidth floor's time
on Llama-3.2-1B's qkv and o_proj (BENCHMARKS.md, kernel choices, 'skinny matmul'). One
program per BLOCK_N output columns streams its rows of W in BLOCK_K steps; x is padded
to 16 rows in registers so the products run on tensor cores. Float32 accumulation, no
split-K (an atomic reduction would cost two more launches).

On Hopper the kernel is launched with programmatic dependent launch (pdl.py) and pulls
the first `prefetch_bytes` of its weight (KernelConfig.l2_prefetch_bytes) towards L2
while the kernel before it finishes.

Tried and measured slower: folding the RMSNorm into this kernel (gain and 1/rms applied
to x inside the K loop) slowed each call by more than the norm launches it saved;
elementwise work on a dot operand in the loop seems to cost the loop its pipelining, as
SiLU fused into the down projection did (BENCHMARKS.md, decode latency, run 6). Split-K
with the next kernel adding the partials was slower at 2 and 4 shares on Llama-3.2-1B at
batch 1, and merely giving this loop bounds computed at run time (a share's start and end)
cost the unsplit kernel 15% (run 17)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.embedded.kernels.fused import _to_cache, rotate_pair, silu_times
from worker.embedded.kernels.pdl import enter, launch_options, pdl_on
from worker.engine_api import KernelConfig

MAX_ROWS = 16  # x is padded to this many rows: tl.dot needs at least 16


@triton.jit
def _prefetch_l2(ptrs):
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _gemv(X, W, B, Y, M, N, K, stride_xm, stride_wn, stride_ym,
          COS, SIN, POS, SLOTS, KC, VC, k_inv, v_inv, stride_cos,
          HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
          USE_GDC: tl.constexpr, PREFETCH_K: tl.constexpr, GATED: tl.constexpr, ROPE: tl.constexpr,
          HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, KV_FP8: tl.constexpr):
    pid = tl.program_id(0)
    m = tl.arange(0, 16)  # MAX_ROWS
    m_ok = m < M
    kk = tl.arange(0, BLOCK_K)
    if ROPE:
        # W is a fused qkv projection of N rows; this program reads BLOCK_N rotary pairs:
        # rows n (first halves of their heads) and up = n + HEAD_DIM / 2 (their partners)
        pair = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        head = pair // (HEAD_DIM // 2)
        dim = pair % (HEAD_DIM // 2)
        n = head * HEAD_DIM + dim
        n_ok = pair < N // 2
        up = n + HEAD_DIM // 2
        last_up = N - 1
    else:
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        up = n + N  # GATED: W is [gate; up], 2N rows, and this program reads both halves' rows n
        last_up = 2 * N - 1
    if PREFETCH_K > 0:
        # Weights never depend on earlier kernels: pull this program's first PREFETCH_K
        # columns towards L2 while the kernel before finishes (one address per 128-byte
        # line of 16-bit values).
        lines = tl.arange(0, PREFETCH_K // 64) * 64
        _prefetch_l2(W + tl.minimum(n, N - 1)[:, None] * stride_wn + lines[None, :])
        if GATED or ROPE:
            _prefetch_l2(W + tl.minimum(up, last_up)[:, None] * stride_wn + lines[None, :])
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
        if GATED or ROPE:
            wu = tl.load(W + up[:, None] * stride_wn + k[None, :], mask=w_ok, other=0.0)
            acc_up += tl.dot(x, tl.trans(wu))
    if HAS_BIAS:
        acc += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if ROPE:
            acc_up += tl.load(B + up, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = acc.to(Y.dtype.element_ty)
    if GATED:  # each projection rounded to the output dtype first, as the unfused pair rounds
        y = silu_times(y, acc_up.to(Y.dtype.element_ty))
    if ROPE:
        _rope_epilogue(Y, y, acc_up.to(Y.dtype.element_ty), m, m_ok, n, up, n_ok, head, dim, stride_ym,
                       COS, SIN, POS, SLOTS, KC, VC, k_inv, v_inv, stride_cos, HQ, HKV, HEAD_DIM, KV_FP8)
    else:
        tl.store(Y + m[:, None] * stride_ym + n[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _rope_epilogue(Y, y1, y2, m, m_ok, n, up, n_ok, head, dim, stride_ym, COS, SIN, POS, SLOTS, KC, VC, k_inv, v_inv,
                   stride_cos, HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, KV_FP8: tl.constexpr):
    """What fused.rope_and_cache does after the qkv projection, on this program's pairs:
    q and k rotated (y1, y2: each pair's halves, rounded to the output dtype), the whole
    row written to Y, and k and v to the paged cache at each token's slot."""
    pos = tl.load(POS + m, mask=m_ok, other=0)
    cos = tl.load(COS + pos[:, None] * stride_cos + dim[None, :])
    sin = tl.load(SIN + pos[:, None] * stride_cos + dim[None, :])
    r1, r2 = rotate_pair(y1, y2, cos, sin)
    rotated = (head < HQ + HKV)[None, :]
    r1 = tl.where(rotated, r1, y1)
    r2 = tl.where(rotated, r2, y2)
    ok = m_ok[:, None] & n_ok[None, :]
    tl.store(Y + m[:, None] * stride_ym + n[None, :], r1, mask=ok)
    tl.store(Y + m[:, None] * stride_ym + up[None, :], r2, mask=ok)
    # The cache is [blocks, block_size, HKV, HEAD_DIM]: a slot's heads are contiguous.
    slot = tl.load(SLOTS + m, mask=m_ok, other=0).to(tl.int64)
    is_k = (head >= HQ) & (head < HQ + HKV)
    is_v = head >= HQ + HKV
    kv_head = tl.where(is_k, head - HQ, head - HQ - HKV)
    at = slot[:, None] * (HKV * HEAD_DIM) + (kv_head * HEAD_DIM + dim)[None, :]
    k_ok = ok & is_k[None, :]
    v_ok = ok & is_v[None, :]
    tl.store(KC + at, _to_cache(r1, k_inv, KV_FP8), mask=k_ok)
    tl.store(KC + at + HEAD_DIM // 2, _to_cache(r2, k_inv, KV_FP8), mask=k_ok)
    tl.store(VC + at, _to_cache(r1, v_inv, KV_FP8), mask=v_ok)
    tl.store(VC + at + HEAD_DIM // 2, _to_cache(r2, v_inv, KV_FP8), mask=v_ok)


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
        *_NO_ROPE_ARGS(w), HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0,
        USE_GDC=use_pdl, PREFETCH_K=prefetch_columns(w.shape[0], K, w, prefetch_bytes) if use_pdl else 0, GATED=gated,
        ROPE=False, HQ=1, HKV=1, HEAD_DIM=2, KV_FP8=False,
        num_warps=num_warps, num_stages=num_stages, **launch_options(use_pdl),
    )
    return y


def _NO_ROPE_ARGS(w: torch.Tensor) -> tuple:
    """The rotary epilogue's pointer and scalar arguments, unused without it."""
    return (w, w, w, w, w, w, 1.0, 1.0, 0)


def gemv_rope(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
              positions: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              num_heads: int, num_kv_heads: int, block_n: int = 16, block_k: int = 256, num_warps: int = 4,
              num_stages: int = 4, pdl: bool = KernelConfig.pdl, prefetch_bytes: int = KernelConfig.l2_prefetch_bytes,
              k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """The fused qkv projection x [M, K] (M <= 16) @ w[N, K].T (+ bias) with what
    fused.rope_and_cache does after it done in the epilogue: q and k rotated (cos and sin
    [max_pos, D/2] float32 at `positions`), k and v written to the paged cache at `slots`
    (over k_scale and v_scale for an FP8 cache). Returns the [M, N] output, q and k rotated,
    equal to gemv then rope_and_cache. block_n counts rotary pairs a program (it reads
    2 * block_n weight rows)."""
    M, K = x.shape
    N = w.shape[0]
    D = k_cache.shape[-1]
    if N != (num_heads + 2 * num_kv_heads) * D or D % 2:
        raise ValueError(f"gemv_rope: {N} weight rows are not {num_heads} + 2 x {num_kv_heads} heads of {D}")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    use_pdl = pdl_on(x.device, M, pdl)
    _gemv[(triton.cdiv(N // 2, block_n),)](
        x, w, w if bias is None else bias, y, M, N, K, x.stride(0), w.stride(0), y.stride(0),
        cos, sin, positions, slots, k_cache, v_cache, 1.0 / k_scale, 1.0 / v_scale, cos.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0,
        USE_GDC=use_pdl, PREFETCH_K=prefetch_columns(N, K, w, prefetch_bytes) if use_pdl else 0, GATED=False,
        ROPE=True, HQ=num_heads, HKV=num_kv_heads, HEAD_DIM=D, KV_FP8=k_cache.dtype == torch.float8_e4m3fn,
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
