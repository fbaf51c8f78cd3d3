"""The quantized projections on a GPU (worker/embedded/quant.py, kernels/qgemv.py):
each path checked against a float64 reference on fresh random inputs, then decode-sized
calls timed against the bf16 skinny matmul (kernels/gemv.py) and cuBLAS.

Correctness: QuantLinear of each scheme on rows 1..256 (the Triton skinny kernel up to
16 rows, torch._scaled_mm / torch._int_mm / F.linear above), against float64 math on
the same 8-bit weights and the activation quantized per token by torch (the CPU
emulation's rounding), and the per-token quantization kernel against torch's.
Timing: inside a CUDA graph cycling through enough weight copies to overflow L2, as
bench/gemv_tune.py does; a quantized-activation path includes its quantization kernel
(fp8: quantize_rows then qgemv's 8-bit dot; upcast: W8A16 in qgemv).
The RMSNorm and SiLU kernels quantizing their own output are timed against the 16-bit
kernel and the separate quantization kernel, at --fused-rows rows.
--sweep tries a few tile configurations of the FP8 skinny kernel (x quantized
beforehand, or not at all) at one row.
Prints tables and writes JSON.

    python -m bench.quant_kernels --out quant_kernels.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
import triton.testing

from bench.gemv_tune import SHAPES as GEMV_SHAPES
from worker.embedded.kernels.gemv import gemv, gemv_config
from worker.embedded.kernels.qgemv import qgemv, qgemv_config, quantize_rows as quantize_rows_kernel
from worker.embedded.quant import FP8, SCHEMES, QuantLinear, cuda_path, quantize_rows
from worker.engine_api import KernelConfig

SHAPES = GEMV_SHAPES  # name: (N, K)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def reference(m: QuantLinear, x: torch.Tensor, quantize_x: bool) -> torch.Tensor:
    w = m.weight.double() * m.weight_scale.double()[:, None]
    if quantize_x:
        q, s = quantize_rows(x, m.scheme.activation)
        x = q.double() * s.double()[:, None]
    return x.double() @ w.T + (m.bias.double() if m.bias is not None else 0)


def check(rows_list) -> list[dict]:
    out = []
    g = torch.Generator(device="cuda").manual_seed(1)
    for (name, (N, K)), scheme, skinny in itertools.product(SHAPES.items(), SCHEMES.values(), ("fp8", "upcast")):
        if skinny == "upcast" and scheme.name != "fp8":
            continue
        lin = torch.nn.Linear(K, N, bias=name.startswith("135m"), device="cuda", dtype=torch.bfloat16)
        torch.nn.init.normal_(lin.weight, 0, 0.02, generator=g)
        m = QuantLinear.from_linear(lin, scheme)
        m.kernels = KernelConfig(fp8_skinny_matmul=skinny)
        for M in rows_list:
            if skinny == "upcast" and M > 16:
                continue
            x = torch.randn(M, K, generator=g, device="cuda").to(torch.bfloat16)
            x[:, :4] *= 20  # a few outlier channels, as real activations have
            y = m(x)
            quantized_x = (scheme.activation is not None and not (skinny == "upcast" and M <= 16)
                           and cuda_path(scheme.activation, M) != "w8a16_mm")
            out.append({"shape": name, "scheme": scheme.name, "skinny": skinny, "rows": M,
                        "path": cuda_path(scheme.activation, M), "nan": bool(torch.isnan(y).any()),
                        "rel_err": rel_err(y, reference(m, x, quantized_x)),
                        "bf16_rel_err": rel_err(F.linear(x, lin.weight).float(), x.double() @ lin.weight.double().T)})
    # The RMSNorm and SiLU-and-multiply kernels quantizing their own output (fused_quant)
    # against the separate kernel on their 16-bit output: the share of 8-bit values that
    # differ (0 expected) as rel_err, plus 1 if any scale differs.
    from worker.embedded.kernels.fused import add_rms_norm, silu_and_mul, silu_and_mul_quant

    for dtype, (M, K) in itertools.product((FP8, torch.int8), ((1, 4096), (16, 14336), (300, 4096), (300, 14336))):
        h, res = (torch.randn(M, K, generator=g, device="cuda").to(torch.bfloat16) for _ in range(2))
        nw = torch.rand(K, generator=g, device="cuda").to(torch.bfloat16) + 0.5
        (q, s), _ = add_rms_norm(h, nw, 1e-5, res, quant=dtype)
        q0, s0 = quantize_rows_kernel(add_rms_norm(h, nw, 1e-5, res)[0], dtype)
        gu = torch.randn(M, 2 * K, generator=g, device="cuda").to(torch.bfloat16) * 3
        q2, s2 = silu_and_mul_quant(gu, dtype)
        q20, s20 = quantize_rows_kernel(silu_and_mul(gu), dtype)
        for kind, a, b, sa, sb in (("norm", q, q0, s, s0), ("silu", q2, q20, s2, s20)):
            out.append({"shape": f"{kind}+quant {M}x{K}", "scheme": str(dtype).removeprefix("torch."), "rows": M,
                        "path": "fused", "nan": bool(torch.isnan(sa).any()),
                        "rel_err": (a.view(torch.uint8) != b.view(torch.uint8)).float().mean().item()
                        + float((sa != sb).any())})
    for dtype, (M, K) in itertools.product((FP8, torch.int8), ((1, 576), (16, 4096), (300, 14336))):
        x = torch.randn(M, K, generator=g, device="cuda").to(torch.bfloat16)
        q, s = quantize_rows_kernel(x, dtype)
        qr, sr = quantize_rows(x, dtype)
        deq = q.double() * s.double()
        out.append({"shape": f"quantize_rows {M}x{K}", "scheme": str(dtype).removeprefix("torch."), "rows": M,
                    "path": "triton", "nan": bool(torch.isnan(deq).any()),
                    "rel_err": rel_err(deq, qr.double() * sr.double()[:, None]),
                    "scale_rel_err": rel_err(s[:, 0], sr.double())})
    return out


def bench_us(fn, copies: int) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median") * 1000 / copies


def timing(rows_list) -> list[dict]:
    out = []
    for (name, (N, K)), M in itertools.product(SHAPES.items(), rows_list):
        copies = max(2, -(-256 * 2**20 // (N * K * 2)))
        ws = [torch.randn(N, K, device="cuda").to(torch.bfloat16) * 0.02 for _ in range(copies)]
        fp8 = [quantize_rows(w, FP8) for w in ws]
        i8 = [quantize_rows(w, torch.int8) for w in ws]
        x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
        cfg = gemv_config(N, K)
        q16, q8 = qgemv_config(N, K, 2), qgemv_config(N, K, 1)

        def tiles(c):
            return dict(block_n=c[0], block_k=c[1], num_warps=c[2], num_stages=c[3])

        def prequantized(w, s):
            xq, xs = quantize_rows_kernel(x, w.dtype)
            return qgemv(xq, w, s, None, xs, out_dtype=torch.bfloat16, **tiles(q8))

        def scaled_mm(w, s):
            xq, xs = quantize_rows_kernel(x, FP8)
            return torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=s[None, :], out_dtype=torch.bfloat16)

        r = {"shape": name, "N": N, "K": K, "rows": M,
             "bf16_floor_us": N * K * 2 / 4.15e12 * 1e6, "8bit_floor_us": N * K / 4.15e12 * 1e6,
             "bf16_cublas_us": bench_us(lambda: [F.linear(x, w) for w in ws], copies),
             "bf16_gemv_us": bench_us(lambda: [gemv(x, w, None, *cfg) for w in ws], copies),
             "fp8_prequantized_us": bench_us(lambda: [prequantized(w, s) for w, s in fp8], copies),
             "fp8_upcast_us": bench_us(lambda: [qgemv(x, w, s, None, **tiles(q16)) for w, s in fp8], copies),
             "fp8_scaled_mm_us": bench_us(lambda: [scaled_mm(w, s) for w, s in fp8], copies),
             "int8_w8a16_us": bench_us(lambda: [qgemv(x, w, s, None, **tiles(q16)) for w, s in i8], copies),
             "int8_w8a8_us": bench_us(lambda: [prequantized(w, s) for w, s in i8], copies),
             "quantize_rows_us": bench_us(lambda: [quantize_rows_kernel(x, FP8) for _ in range(copies)], copies)}
        out.append(r)
        print(f"{name:>12} M={M:<2} floor bf16 {r['bf16_floor_us']:6.2f} 8-bit {r['8bit_floor_us']:6.2f} | cuBLAS {r['bf16_cublas_us']:6.2f} "
              f"gemv {r['bf16_gemv_us']:6.2f} | fp8 {r['fp8_prequantized_us']:6.2f} "
              f"upcast {r['fp8_upcast_us']:6.2f} _scaled_mm {r['fp8_scaled_mm_us']:6.2f} | int8 w8a16 {r['int8_w8a16_us']:6.2f} "
              f"w8a8 {r['int8_w8a8_us']:6.2f} | quant {r['quantize_rows_us']:5.2f} us", flush=True)
        del ws, fp8, i8
    return out


def fused_timing(rows_list, widths=(4096, 14336)) -> list[dict]:
    """The kernels before an 8-bit projection over many rows, FP8, us a call: the RMSNorm
    (residual add) and SiLU-and-multiply kernels quantizing their own output (fused_quant),
    against the 16-bit kernel followed by the separate quantization kernel."""
    from worker.embedded.kernels.fused import add_rms_norm, silu_and_mul, silu_and_mul_quant

    out = []
    for K, M in itertools.product(widths, rows_list):
        copies = max(2, -(-256 * 2**20 // (M * K * 2)))  # the inputs overflow L2, as the weights above
        hs = [torch.randn(M, K, device="cuda").to(torch.bfloat16) for _ in range(copies)]
        nw = torch.rand(K, device="cuda").to(torch.bfloat16) + 0.5
        gus = [torch.randn(M, 2 * K, device="cuda").to(torch.bfloat16) for _ in range(copies)]
        r = {"K": K, "rows": M,
             "norm_then_quant_us": bench_us(lambda: [quantize_rows_kernel(add_rms_norm(h, nw, 1e-5, h)[0], FP8) for h in hs], copies),
             "norm_quant_us": bench_us(lambda: [add_rms_norm(h, nw, 1e-5, h, quant=FP8) for h in hs], copies),
             "silu_then_quant_us": bench_us(lambda: [quantize_rows_kernel(silu_and_mul(gu), FP8) for gu in gus], copies),
             "silu_quant_us": bench_us(lambda: [silu_and_mul_quant(gu, FP8) for gu in gus], copies)}
        out.append(r)
        print(f"K={K:<6} M={M:<5} norm+quantize {r['norm_then_quant_us']:8.2f} fused {r['norm_quant_us']:8.2f} | "
              f"silu+quantize {r['silu_then_quant_us']:8.2f} fused {r['silu_quant_us']:8.2f} us", flush=True)
        del hs, gus
    return out


def sweep(shapes: list[str], grid: dict) -> list[dict]:
    """Tile configurations of the FP8 skinny kernel at one row; `grid`: lists of variants
    ("fp8": x quantized beforehand, "upcast"), block_n, block_k, warps and stages."""
    out = []
    for name in shapes:
        N, K = SHAPES[name]
        copies = max(2, -(-256 * 2**20 // (N * K)))
        fp8 = [quantize_rows(torch.randn(N, K, device="cuda") * 0.02, FP8) for _ in range(copies)]
        x = torch.randn(1, K, device="cuda").to(torch.bfloat16)
        xq, xs = quantize_rows_kernel(x, FP8)
        now = qgemv_config(N, K, 1)
        now_us = bench_us(lambda: [qgemv(xq, w, s, None, xs, out_dtype=torch.bfloat16, block_n=now[0], block_k=now[1],
                                         num_warps=now[2], num_stages=now[3]) for w, s in fp8], copies)
        for variant, bn, bk, nw, ns in itertools.product(grid["variants"], grid["block_n"], grid["block_k"], grid["warps"],
                                                         grid["stages"]):
            xb = 1 if variant == "fp8" else 2
            if (16 * xb + bn) * bk * ns > 200_000:
                continue
            kw = dict(x_scale=xs, out_dtype=torch.bfloat16) if variant == "fp8" else {}
            xin = xq if variant == "fp8" else x
            try:
                us = bench_us(lambda: [qgemv(xin, w, s, None, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, **kw)
                                       for w, s in fp8], copies)
            except Exception as e:  # a configuration that does not compile or fit
                us = None
                print(f"sweep {name} {variant} {bn}/{bk}/{nw}/{ns}: {type(e).__name__}")
            out.append({"shape": name, "variant": variant, "block_n": bn, "block_k": bk, "warps": nw, "stages": ns, "us": us})
        for variant in grid["variants"]:
            best = min((r for r in out if r["shape"] == name and r["variant"] == variant and r["us"]), key=lambda r: r["us"])
            print(f"sweep {name:>12} {variant:>6}: best {best['block_n']}/{best['block_k']}/{best['warps']}/{best['stages']} "
                  f"{best['us']:.2f} us; qgemv_config's {'/'.join(map(str, now))} {now_us:.2f} us "
                  f"(8-bit floor {N * K / 4.15e12 * 1e6:.2f})", flush=True)
        out.append({"shape": name, "variant": "fp8", "config_now": list(now), "us": now_us})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--check-rows", type=int, nargs="+", default=[1, 5, 16, 17, 64, 256])
    ap.add_argument("--sweep", nargs="*", default=[], help="shapes whose FP8 skinny tiles to sweep at one row")
    ap.add_argument("--sweep-variants", nargs="+", default=["fp8", "upcast"], choices=["fp8", "upcast"])
    ap.add_argument("--sweep-block-n", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--sweep-block-k", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--sweep-warps", type=int, nargs="+", default=[4])
    ap.add_argument("--sweep-stages", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--fused-rows", type=int, nargs="*", default=[1, 16, 64, 256, 1024, 2048],
                    help="row counts at which to time the norm and SiLU kernels quantizing their output, FP8 (none: skip)")
    ap.add_argument("--no-timing", action="store_true", help="no projection timing: the checks, --fused-rows and --sweep only")
    ap.add_argument("--check-only", action="store_true", help="the correctness checks alone, no timing")
    ap.add_argument("--out", default="quant_kernels.json")
    args = ap.parse_args()
    print(f"on {torch.cuda.get_device_name()}")
    checks = check(args.check_rows)
    print(f"{'shape':>24} {'scheme':>17} {'skinny':>6} {'rows':>4} {'path':>8} {'rel err':>9} {'bf16 rel err':>12} {'NaN':>4}")
    for r in checks:
        print(f"{r['shape']:>24} {r['scheme']:>17} {r.get('skinny', '-'):>6} {r['rows']:>4} {r['path']:>8} {r['rel_err']:>9.2e} "
              f"{r.get('bf16_rel_err', float('nan')):>12.2e} {str(r['nan']):>4}")
    result = {"device": torch.cuda.get_device_name(), "checks": checks}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if args.check_only:
        return
    if not args.no_timing:
        result["timing"] = timing(args.rows)
    if args.fused_rows:
        result["fused_timing"] = fused_timing(args.fused_rows)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    result["sweep"] = sweep(args.sweep, {"variants": args.sweep_variants, "block_n": args.sweep_block_n,
                                         "block_k": args.sweep_block_k, "warps": args.sweep_warps, "stages": args.sweep_stages})
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
