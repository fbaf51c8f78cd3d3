"""Fused elementwise kernels for the decoder layer. Each replaces several small PyTorch
ops (and their launches, which dominate a CUDA-graphed decode step of a small model) and
rounds where the PyTorch formulation rounds, so results match it bit for bit or nearly.

- add_rms_norm: residual add and RMSNorm in one pass;
- rope_and_cache: rotary embedding of q and k in place, and k and v into the paged cache;
- silu_and_mul: SiLU(gate) * up from the fused gate_up projection.

Each also takes its input as the float32 partial sums of a split-K skinny matmul
(gemv.gemv_split_k, [splits, T, N]): it adds them and rounds the sum to the model's dtype,
as the unsplit matmul rounds its output, so the split costs no launch of its own."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.embedded.kernels.pdl import enter, launch_options, pdl_on
from worker.engine_api import KernelConfig


@triton.jit
def _load_summed(X, offs, mask, stride_s, SPLITS: tl.constexpr, like):
    """X at offs; with SPLITS > 1, X holds that many float32 partial sums `stride_s` apart,
    returned added up and rounded to the dtype of `like` (a pointer)."""
    x = tl.load(X + offs, mask=mask, other=0.0)
    if SPLITS > 1:
        for s in tl.static_range(1, SPLITS):
            x += tl.load(X + s * stride_s + offs, mask=mask, other=0.0)
        x = x.to(like.dtype.element_ty)
    return x


@triton.jit
def _add_rms_norm(X, R, W, OUT, R_OUT, stride_x, stride_r, stride_o, stride_ro, stride_xs, N, eps,
                  HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_GDC: tl.constexpr, SPLITS: tl.constexpr):
    enter(USE_GDC)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = _load_summed(X, row * stride_x + cols, ok, stride_xs, SPLITS, OUT)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the add rounds, as in PyTorch
        tl.store(R_OUT + row * stride_ro + cols, x, mask=ok)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / N
    normed = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(W + cols, mask=ok, other=0.0)
    tl.store(OUT + row * stride_o + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype), mask=ok)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 pdl: bool = KernelConfig.pdl):
    """RMSNorm(x + residual) and the new residual (x + residual); without a residual,
    RMSNorm(x) and x. x may be split-K partials [splits, T, N] (float32) when there is a
    residual, whose dtype the sum is rounded to."""
    splits = x.shape[0] if x.dim() == 3 else 1
    if splits > 1 and residual is None:
        raise ValueError("add_rms_norm: split-K partials need a residual (its dtype is the output's)")
    T, N = x.shape[-2:]
    out = torch.empty((T, N), dtype=residual.dtype if splits > 1 else x.dtype, device=x.device)
    new_res = torch.empty_like(out) if residual is not None else x
    use_pdl = pdl_on(x.device, T, pdl)
    _add_rms_norm[(T,)](x, residual if residual is not None else x, weight, out, new_res,
                        x.stride(-2), (residual if residual is not None else x).stride(0), out.stride(0), new_res.stride(0),
                        x.stride(0) if splits > 1 else 0, N, eps, HAS_RESIDUAL=residual is not None,
                        BLOCK=triton.next_power_of_2(N), USE_GDC=use_pdl, SPLITS=splits, num_warps=4, **launch_options(use_pdl))
    return out, new_res


@triton.jit
def _rope_and_cache(Q, K, V, COS, SIN, POS, SLOTS, KC, VC, k_inv, v_inv, P,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_ps, stride_pt,
                    HQ: tl.constexpr, HKV: tl.constexpr, HQ_PAD: tl.constexpr, HKV_PAD: tl.constexpr,
                    HALF: tl.constexpr, USE_GDC: tl.constexpr, KV_FP8: tl.constexpr, SPLITS: tl.constexpr):
    enter(USE_GDC)
    t = tl.program_id(0)
    pos = tl.load(POS + t)
    # int64: slot * HKV * 2 * HALF passes 2**31 in a small model's large cache (FP8 on an
    # H200), and a CUDA graph's slots arrive as int32
    slot = tl.load(SLOTS + t).to(tl.int64)
    d = tl.arange(0, HALF)
    cos = tl.load(COS + pos * stride_cos + d)[None, :]
    sin = tl.load(SIN + pos * stride_cos + d)[None, :]
    # Split-K partials of the qkv projection, when SPLITS > 1: [SPLITS, T, (HQ + 2 HKV) * 2 HALF]
    # float32, whose sums (rounded) land in q, k and v before the rotation, as an unsplit
    # projection's output would be.
    hq = tl.arange(0, HQ_PAD)[:, None]
    q_ok = hq < HQ
    qp = Q + t * stride_qt + hq * stride_qh + d[None, :]
    if SPLITS > 1:
        pq = t * stride_pt + hq * (2 * HALF) + d[None, :]
        q1 = _load_summed(P, pq, q_ok, stride_ps, SPLITS, Q)
        q2 = _load_summed(P, pq + HALF, q_ok, stride_ps, SPLITS, Q)
    else:
        q1 = tl.load(qp, mask=q_ok, other=0.0)
        q2 = tl.load(qp + HALF, mask=q_ok, other=0.0)
    q1f, q2f = q1.to(tl.float32), q2.to(tl.float32)
    tl.store(qp, (q1f * cos - q2f * sin).to(q1.dtype), mask=q_ok)
    tl.store(qp + HALF, (q2f * cos + q1f * sin).to(q1.dtype), mask=q_ok)
    hk = tl.arange(0, HKV_PAD)[:, None]
    k_ok = hk < HKV
    kp = K + t * stride_kt + hk * stride_kh + d[None, :]
    if SPLITS > 1:
        pk = t * stride_pt + (HQ + hk) * (2 * HALF) + d[None, :]
        k1 = _load_summed(P, pk, k_ok, stride_ps, SPLITS, K)
        k2 = _load_summed(P, pk + HALF, k_ok, stride_ps, SPLITS, K)
    else:
        k1 = tl.load(kp, mask=k_ok, other=0.0)
        k2 = tl.load(kp + HALF, mask=k_ok, other=0.0)
    k1f, k2f = k1.to(tl.float32), k2.to(tl.float32)
    r1 = (k1f * cos - k2f * sin).to(k1.dtype)
    r2 = (k2f * cos + k1f * sin).to(k1.dtype)
    tl.store(kp, r1, mask=k_ok)
    tl.store(kp + HALF, r2, mask=k_ok)
    # The cache is [blocks, block_size, HKV, 2 * HALF]: a slot's heads are contiguous.
    cp = slot * (HKV * 2 * HALF) + hk * (2 * HALF) + d[None, :]
    vp = V + t * stride_vt + hk * stride_vh + d[None, :]
    if SPLITS > 1:
        pv = t * stride_pt + (HQ + HKV + hk) * (2 * HALF) + d[None, :]
        v1 = _load_summed(P, pv, k_ok, stride_ps, SPLITS, V)
        v2 = _load_summed(P, pv + HALF, k_ok, stride_ps, SPLITS, V)
        tl.store(vp, v1, mask=k_ok)
        tl.store(vp + HALF, v2, mask=k_ok)
    else:
        v1 = tl.load(vp, mask=k_ok, other=0.0)
        v2 = tl.load(vp + HALF, mask=k_ok, other=0.0)
    tl.store(KC + cp, _to_cache(r1, k_inv, KV_FP8), mask=k_ok)
    tl.store(KC + cp + HALF, _to_cache(r2, k_inv, KV_FP8), mask=k_ok)
    tl.store(VC + cp, _to_cache(v1, v_inv, KV_FP8), mask=k_ok)
    tl.store(VC + cp + HALF, _to_cache(v2, v_inv, KV_FP8), mask=k_ok)


@triton.jit
def _to_cache(x, inv, KV_FP8: tl.constexpr):
    """x as the cache stores it (attention.to_cache): an FP8 cache holds the 16-bit value
    times 1 / its scale in float32, clamped to +-448 and rounded once to float8 E4M3."""
    if KV_FP8:
        x = tl.minimum(tl.maximum(x.to(tl.float32) * inv, -448.0), 448.0).to(tl.float8e4nv)
    return x


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   positions: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   pdl: bool = KernelConfig.pdl, k_scale: float = 1.0, v_scale: float = 1.0,
                   partials: torch.Tensor | None = None) -> None:
    """q [T, Hq, D], k and v [T, Hkv, D] (views are fine, last dim contiguous); cos and
    sin [max_pos, D/2] float32. Rotates q and k in place and writes k and v to the cache.
    With `partials` (the qkv projection's split-K partial sums [splits, T, (Hq + 2 Hkv) D],
    float32, contiguous), q, k and v are outputs: their sums, q and k rotated."""
    T, hq, D = q.shape
    hkv = k.shape[1]
    splits = partials.shape[0] if partials is not None else 1
    if partials is not None:
        assert partials.is_contiguous() and partials.shape[1:] == (T, (hq + 2 * hkv) * D), partials.shape
    use_pdl = pdl_on(q.device, T, pdl)
    _rope_and_cache[(T,)](q, k, v, cos, sin, positions, slots, k_cache, v_cache, 1.0 / k_scale, 1.0 / v_scale,
                          q if partials is None else partials,
                          q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
                          0 if partials is None else partials.stride(0), 0 if partials is None else partials.stride(1),
                          HQ=hq, HKV=hkv, HQ_PAD=triton.next_power_of_2(hq), HKV_PAD=triton.next_power_of_2(hkv),
                          HALF=D // 2, USE_GDC=use_pdl, KV_FP8=k_cache.dtype == torch.float8_e4m3fn, SPLITS=splits,
                          num_warps=4, **launch_options(use_pdl))


@triton.jit
def _silu_and_mul(GU, OUT, stride_gu, stride_o, stride_s, N, BLOCK: tl.constexpr, USE_GDC: tl.constexpr,
                  SPLITS: tl.constexpr):
    enter(USE_GDC)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    g = _load_summed(GU, row * stride_gu + cols, ok, stride_s, SPLITS, OUT)
    u = _load_summed(GU, row * stride_gu + N + cols, ok, stride_s, SPLITS, OUT)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # SiLU rounds to the input dtype, as F.silu does
    tl.store(OUT + row * stride_o + cols, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=ok)


def silu_and_mul(gate_up: torch.Tensor, pdl: bool = KernelConfig.pdl, dtype: torch.dtype | None = None) -> torch.Tensor:
    """SiLU(gate) * up of gate_up [T, 2N], or of its split-K partials [splits, T, 2N]
    (float32; `dtype` is then the model's, which their sum is rounded to)."""
    splits = gate_up.shape[0] if gate_up.dim() == 3 else 1
    T, two_n = gate_up.shape[-2:]
    n = two_n // 2
    out = torch.empty((T, n), dtype=dtype or gate_up.dtype, device=gate_up.device)
    block = 1024
    use_pdl = pdl_on(gate_up.device, T, pdl)
    _silu_and_mul[(T, triton.cdiv(n, block))](gate_up, out, gate_up.stride(-2), out.stride(0),
                                              gate_up.stride(0) if splits > 1 else 0, n, BLOCK=block,
                                              USE_GDC=use_pdl, SPLITS=splits, num_warps=4, **launch_options(use_pdl))
    return out
