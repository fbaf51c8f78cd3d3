"""Fused elementwise kernels for the decoder layer. Each replaces several small PyTorch
ops (and their launches, which dominate a CUDA-graphed decode step of a small model) and
rounds where the PyTorch formulation rounds, so results match it bit for bit or nearly.

- add_rms_norm: residual add and RMSNorm in one pass;
- rope_and_cache: rotary embedding of q and k in place, and k and v into the paged cache;
- silu_and_mul: SiLU(gate) * up from the fused gate_up projection.

add_rms_norm can also quantize its output per row for the 8-bit projection after it
(`quant`: float8 E4M3 or int8), as kernels/qgemv.py's quantize_rows does and bit for bit
like it (both call `quantize_row`): one launch where there were two before each FP8 or
W8A8 qkv and gate_up projection. It then writes only the 8-bit rows and their scales: the
projection reads nothing else.

silu_and_mul_quant does the same for down_proj, but needs each row whole in one program
(its scale is the row's amax). At one row that program held the FP8 8B step 3.85 us a
layer on an H200, more than the SiLU kernel and the quantization kernel after it together
(BENCHMARKS.md, run 19), so the MLP uses it only in steps of many rows, where there are
programs enough for every SM and what it saves is the 16-bit intermediate's round trip
through memory."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.embedded.kernels.pdl import enter, launch_options, pdl_on
from worker.engine_api import KernelConfig


@triton.jit
def quantize_row(x, QMAX: tl.constexpr, IS_INT: tl.constexpr):
    """x (one row, float32, zeros where masked) -> (x / scale on the 8-bit grid, still
    float32 and clamped, ready for the cast; scale = amax / QMAX). Shared by every kernel
    that quantizes activations per token, so that they agree bit for bit."""
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / QMAX, 1e-12)
    # Rounded division, not the approximate one `/` compiles to: that one is free to differ
    # between kernels (on an H200 the norm kernel's int8 output differed from the
    # quantization kernel's in one value of 1.2M, a .5 boundary).
    q = tl.div_rn(x, scale)
    if IS_INT:  # round half away from zero (the cast truncates)
        q = tl.where(q >= 0, q + 0.5, q - 0.5)
    return tl.minimum(tl.maximum(q, -QMAX), QMAX), scale


def quant_args(x: torch.Tensor, quant: torch.dtype | None) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
    """(q [T, K] of `quant`, scale [T, 1] float32, the kernel's constexprs) for a kernel
    that quantizes its [T, K] output per row; (None, None, QUANT off) without `quant`."""
    if quant is None:
        return None, None, {"QUANT": False, "QMAX": 1.0, "IS_INT": False}
    qmax = 127.0 if quant == torch.int8 else torch.finfo(quant).max
    q = torch.empty(x.shape, dtype=quant, device=x.device)
    s = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    return q, s, {"QUANT": True, "QMAX": qmax, "IS_INT": quant == torch.int8}


@triton.jit
def _add_rms_norm(X, R, W, OUT, R_OUT, S, stride_x, stride_r, stride_o, stride_ro, N, eps,
                  HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_GDC: tl.constexpr,
                  QUANT: tl.constexpr, QMAX: tl.constexpr, IS_INT: tl.constexpr):
    """OUT: the normed row in x's dtype, or with QUANT the row quantized (and its scale
    in S)."""
    enter(USE_GDC)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the add rounds, as in PyTorch
        tl.store(R_OUT + row * stride_ro + cols, x, mask=ok)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / N
    normed = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(W + cols, mask=ok, other=0.0)
    y = (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype)
    if QUANT:
        q, scale = quantize_row(y.to(tl.float32), QMAX, IS_INT)
        tl.store(OUT + row * stride_o + cols, q.to(OUT.dtype.element_ty), mask=ok)
        tl.store(S + row, scale)
    else:
        tl.store(OUT + row * stride_o + cols, y, mask=ok)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 pdl: bool = KernelConfig.pdl, quant: torch.dtype | None = None):
    """RMSNorm(x + residual) and the new residual (x + residual); without a residual,
    RMSNorm(x) and x. With `quant`, ((q, scale), new residual): the normed rows quantized
    per row to `quant` (q [T, N], scale [T, 1] float32, RMSNorm(...) ~= q * scale), and not
    written in 16 bits."""
    T, N = x.shape
    q, s, qargs = quant_args(x, quant)
    out = torch.empty_like(x) if q is None else q
    new_res = torch.empty_like(x) if residual is not None else x
    use_pdl = pdl_on(x.device, T, pdl)
    res = residual if residual is not None else x
    _add_rms_norm[(T,)](x, res, weight, out, new_res, out if s is None else s,
                        x.stride(0), res.stride(0), out.stride(0), new_res.stride(0), N, eps, HAS_RESIDUAL=residual is not None,
                        BLOCK=triton.next_power_of_2(N), USE_GDC=use_pdl, num_warps=4, **qargs, **launch_options(use_pdl))
    return (out if q is None else (q, s)), new_res


@triton.jit
def _rope_and_cache(Q, K, V, COS, SIN, POS, SLOTS, KC, VC, k_inv, v_inv,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos,
                    HQ: tl.constexpr, HKV: tl.constexpr, HQ_PAD: tl.constexpr, HKV_PAD: tl.constexpr,
                    HALF: tl.constexpr, USE_GDC: tl.constexpr, KV_FP8: tl.constexpr):
    enter(USE_GDC)
    t = tl.program_id(0)
    pos = tl.load(POS + t)
    # int64: slot * HKV * 2 * HALF passes 2**31 in a small model's large cache (FP8 on an
    # H200), and a CUDA graph's slots arrive as int32
    slot = tl.load(SLOTS + t).to(tl.int64)
    d = tl.arange(0, HALF)
    cos = tl.load(COS + pos * stride_cos + d)[None, :]
    sin = tl.load(SIN + pos * stride_cos + d)[None, :]
    hq = tl.arange(0, HQ_PAD)[:, None]
    q_ok = hq < HQ
    qp = Q + t * stride_qt + hq * stride_qh + d[None, :]
    q1 = tl.load(qp, mask=q_ok, other=0.0)
    q2 = tl.load(qp + HALF, mask=q_ok, other=0.0)
    q1f, q2f = q1.to(tl.float32), q2.to(tl.float32)
    tl.store(qp, (q1f * cos - q2f * sin).to(q1.dtype), mask=q_ok)
    tl.store(qp + HALF, (q2f * cos + q1f * sin).to(q1.dtype), mask=q_ok)
    hk = tl.arange(0, HKV_PAD)[:, None]
    k_ok = hk < HKV
    kp = K + t * stride_kt + hk * stride_kh + d[None, :]
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
                   pdl: bool = KernelConfig.pdl, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """q [T, Hq, D], k and v [T, Hkv, D] (views are fine, last dim contiguous); cos and
    sin [max_pos, D/2] float32. Rotates q and k in place and writes k and v to the cache."""
    T, hq, D = q.shape
    hkv = k.shape[1]
    use_pdl = pdl_on(q.device, T, pdl)
    _rope_and_cache[(T,)](q, k, v, cos, sin, positions, slots, k_cache, v_cache, 1.0 / k_scale, 1.0 / v_scale,
                          q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
                          HQ=hq, HKV=hkv, HQ_PAD=triton.next_power_of_2(hq), HKV_PAD=triton.next_power_of_2(hkv),
                          HALF=D // 2, USE_GDC=use_pdl, KV_FP8=k_cache.dtype == torch.float8_e4m3fn, num_warps=4,
                          **launch_options(use_pdl))


@triton.jit
def silu_times(g, u):
    """SiLU(g) * u for g and u in the output dtype, rounded as PyTorch rounds F.silu(g) * u:
    SiLU to the input dtype, then the product. Shared with the gated skinny matmul
    (gemv.py), whose output must equal this kernel's bit for bit."""
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    return (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype)


@triton.jit
def _silu_and_mul(GU, OUT, stride_gu, stride_o, N, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    enter(USE_GDC)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    g = tl.load(GU + row * stride_gu + cols, mask=ok, other=0.0)
    u = tl.load(GU + row * stride_gu + N + cols, mask=ok, other=0.0)
    tl.store(OUT + row * stride_o + cols, silu_times(g, u), mask=ok)


def silu_and_mul(gate_up: torch.Tensor, pdl: bool = KernelConfig.pdl) -> torch.Tensor:
    T, two_n = gate_up.shape
    n = two_n // 2
    out = torch.empty((T, n), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    use_pdl = pdl_on(gate_up.device, T, pdl)
    _silu_and_mul[(T, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block,
                                              USE_GDC=use_pdl, num_warps=4, **launch_options(use_pdl))
    return out


@triton.jit
def _silu_and_mul_quant(GU, Q, S, stride_gu, stride_q, N, BLOCK: tl.constexpr, USE_GDC: tl.constexpr,
                        QMAX: tl.constexpr, IS_INT: tl.constexpr):
    """silu_and_mul's row, whole in one program (the scale needs the row's amax),
    quantized; the 16-bit row itself is not written."""
    enter(USE_GDC)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    g = tl.load(GU + row * stride_gu + cols, mask=ok, other=0.0)
    u = tl.load(GU + row * stride_gu + N + cols, mask=ok, other=0.0)
    q, scale = quantize_row(silu_times(g, u).to(tl.float32), QMAX, IS_INT)
    tl.store(Q + row * stride_q + cols, q.to(Q.dtype.element_ty), mask=ok)
    tl.store(S + row, scale)


def silu_and_mul_quant(gate_up: torch.Tensor, quant: torch.dtype,
                       pdl: bool = KernelConfig.pdl) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU(gate) * up of gate_up [T, 2n], quantized per row to `quant`: (q [T, n], scale
    [T, 1] float32), bit for bit silu_and_mul then kernels/qgemv.py's quantize_rows."""
    T, two_n = gate_up.shape
    n = two_n // 2
    q, s, qargs = quant_args(gate_up[:, :n], quant)
    del qargs["QUANT"]
    block = triton.next_power_of_2(n)
    use_pdl = pdl_on(gate_up.device, T, pdl)
    _silu_and_mul_quant[(T,)](gate_up, q, s, gate_up.stride(0), q.stride(0), n, BLOCK=block, USE_GDC=use_pdl,
                              num_warps=max(4, min(16, block // 512)), **qargs, **launch_options(use_pdl))
    return q, s
