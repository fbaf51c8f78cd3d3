"""The one-row skinny matmul on the CUDA cores (worker/embedded/kernels/gemv.py,
gemv_fma: weights loaded straight into registers, no shared memory, no tensor cores)
against what the engine runs at one row today: the tensor-core skinny kernels (gemv for
16-bit weights, its gated form for a fused gate_up; for FP8 weights qgemv's 8-bit dot
after the per-token quantization kernel, or with x already quantized as the RMSNorm
kernel leaves it; for int8 weights qgemv's W8A16).

Each case sweeps gemv_fma's tiles (block_n, block_k, warps, unroll, acc_2d) and reports
the best next to the engine's tensor-core kernel and to gemv_fma_config's choice, at --rows
rows of x, each timed inside a
CUDA graph that cycles through enough weight copies to overflow L2 (as bench/gemv_tune.py),
and checked against a float64 reference. The 8-bit gemv_fma reads x in 16 bits: it needs
no quantization kernel. Kernels are compiled first by --compile-workers processes.
Prints a table and writes JSON.

    python -m bench.gemv_fma --out gemv_fma.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import multiprocessing

import torch
import torch.nn.functional as F
import triton
import triton.testing

from bench.gemv_tune import SHAPES as GEMV_SHAPES
from worker.embedded.kernels.gemv import acc_2d_fits, gated_faster, gemv, gemv_config, gemv_fma, gemv_fma_config, gemv_gated_config
from worker.embedded.kernels.qgemv import qgemv, qgemv_config, quantize_rows
from worker.embedded.quant import FP8

SHAPES = GEMV_SHAPES  # name: (N, K)
DTYPES = {"bf16": torch.bfloat16, "fp8": FP8, "int8": torch.int8}
DEFAULT_CASES = ["1b.qkv:bf16", "1b.o:bf16", "1b.gate_up:bf16", "1b.down:bf16", "8b.o:bf16", "8b.down:bf16",
                 "8b.qkv:fp8", "8b.o:fp8", "8b.gate_up:fp8", "8b.down:fp8", "8b.down:int8"]
BANDWIDTH = 4.15e12  # the copy bandwidth decode_latency measured on an H200


def bench_us(fn, copies: int) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1000 / copies


def weights(name: str, kind: str, copies: int, seed: int = 0):
    """`copies` (weight, scale or None) of the case's shape; 8-bit ones quantized per output
    channel from a bf16 normal draw."""
    N, K = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(copies):
        w = (torch.randn(N, K, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        if kind == "bf16":
            out.append((w, None))
        else:
            q, s = quantize_rows(w, DTYPES[kind])
            out.append((q, s[:, 0].contiguous()))
    return out


def is_gated(name: str, kind: str) -> bool:
    N, K = SHAPES[name]
    return kind == "bf16" and "gate_up" in name and gated_faster(N, K)


def grid(name: str, kind: str, K: int, args) -> list[tuple]:
    bks = args.block_k_8bit if kind != "bf16" else args.block_k
    return [c for c in itertools.product(args.block_n, bks, args.warps, args.unroll, args.acc_2d)
            if c[1] <= K and (not c[4] or acc_2d_fits(c[0], c[1], args.rows, is_gated(name, kind)))]


def run_fma(x, w, s, name, kind, c):
    bn, bk, nw, unroll, acc = c
    return gemv_fma(x, w, s, block_n=bn, block_k=bk, num_warps=nw, unroll=unroll, acc_2d=bool(acc),
                    gated=is_gated(name, kind), out_dtype=torch.bfloat16)


def _compile(task) -> int:
    """In a worker process: run each configuration once, so Triton's cache holds it."""
    name, kind, configs, rows = task
    N, K = SHAPES[name]
    (w, s), = weights(name, kind, 1)
    x = torch.randn(rows, K, device="cuda").to(torch.bfloat16)
    for c in configs:
        run_fma(x, w, s, name, kind, c)
    torch.cuda.synchronize()
    return len(configs)


def engine_kernel(x, w, s, name, kind):
    """What the engine runs at one row today (the tensor-core kernels)."""
    N, K = SHAPES[name]
    if kind == "bf16":
        if is_gated(name, kind):
            return gemv(x, w, None, *gemv_gated_config(N // 2, K), gated=True)
        return gemv(x, w, None, *gemv_config(N, K))
    if kind == "fp8":
        xq, xs = quantize_rows(x, FP8, pdl=True)
        bn, bk, nw, ns = qgemv_config(N, K, 1)
        return qgemv(xq, w, s, None, xs, out_dtype=torch.bfloat16, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
    bn, bk, nw, ns = qgemv_config(N, K, 2)
    return qgemv(x, w, s, None, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)


def reference(x, w, s, name, kind) -> torch.Tensor:
    wd = w.double() * (s.double()[:, None] if s is not None else 1)
    y = x.double() @ wd.T
    if is_gated(name, kind):
        g, u = y.chunk(2, dim=-1)
        y = F.silu(g) * u
    return y


def rel_err(y, ref) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="shape:weight (bf16, fp8, int8); shapes as bench.gemv_tune's")
    ap.add_argument("--block-n", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--block-k", type=int, nargs="+", default=[256, 512, 1024], help="16-bit weights")
    ap.add_argument("--block-k-8bit", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--unroll", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--acc-2d", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rows", type=int, default=1, help="rows of x (1-4; the engine's tensor-core kernel pads to 16)")
    ap.add_argument("--compile-workers", type=int, default=8)
    ap.add_argument("--out", default="gemv_fma.json")
    args = ap.parse_args()
    cases = [c.split(":") for c in args.cases]
    tasks = [(name, kind, grid(name, kind, SHAPES[name][1], args)) for name, kind in cases]
    if args.compile_workers > 1:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.compile_workers, mp_context=ctx) as pool:
            chunks = [(n, k, cs[i::args.compile_workers], args.rows) for n, k, cs in tasks for i in range(args.compile_workers)]
            print(f"compiled {sum(pool.map(_compile, chunks))} kernels in {args.compile_workers} processes", flush=True)
    results = []
    print(f"{'case':>15} {'floor':>7} {'engine':>7} {'fma best':>8} {'x':>5}  {'best tiles':<18} {'config':>7} {'rel err':>8}  (us)")
    for name, kind, configs in tasks:
        N, K = SHAPES[name]
        wbytes = 2 if kind == "bf16" else 1
        copies = max(2, -(-256 * 2**20 // (N * K * wbytes)))
        ws = weights(name, kind, copies)
        x = torch.randn(args.rows, K, device="cuda").to(torch.bfloat16)
        w0, s0 = ws[0]
        ref = reference(x, w0, s0, name, kind)
        engine_us = bench_us(lambda: [engine_kernel(x, w, s, name, kind) for w, s in ws], copies)
        engine_err = rel_err(engine_kernel(x, w0, s0, name, kind), ref)
        prequantized_us = None
        if kind == "fp8":  # x quantized by the RMSNorm kernel before (qkv, gate_up): the dot alone
            xq, xs = quantize_rows(x, FP8)
            t = qgemv_config(N, K, 1)
            prequantized_us = bench_us(lambda: [qgemv(xq, w, s, None, xs, out_dtype=torch.bfloat16, block_n=t[0], block_k=t[1],
                                                      num_warps=t[2], num_stages=t[3]) for w, s in ws], copies)
        rows = []
        for c in configs:
            err = rel_err(run_fma(x, w0, s0, name, kind, c), ref)
            us = bench_us(lambda: [run_fma(x, w, s, name, kind, c) for w, s in ws], copies)
            rows.append({"block_n": c[0], "block_k": c[1], "warps": c[2], "unroll": c[3], "acc_2d": c[4], "us": us, "rel_err": err})
        best = min(rows, key=lambda r: r["us"])
        chosen = gemv_fma_config(N // 2 if is_gated(name, kind) else N, K, wbytes, gated=is_gated(name, kind), rows=args.rows)
        chosen_us = next((r["us"] for r in rows if (r["block_n"], r["block_k"], r["warps"], r["unroll"], bool(r["acc_2d"])) == chosen), None)
        if chosen_us is None:
            chosen_us = bench_us(lambda: [run_fma(x, w, s, name, kind, chosen) for w, s in ws], copies)
        floor = N * K * wbytes / BANDWIDTH * 1e6
        results.append({"case": f"{name}:{kind}", "rows": args.rows, "N": N, "K": K, "gated": is_gated(name, kind), "floor_us": floor,
                        "engine_us": engine_us, "engine_prequantized_us": prequantized_us, "engine_rel_err": engine_err, "fma_best": best, "fma_config": list(chosen),
                        "fma_config_us": chosen_us, "sweep": rows})
        tiles = f"{best['block_n']}/{best['block_k']}/{best['warps']}/u{best['unroll']}/{'2d' if best['acc_2d'] else '1d'}"
        pre = f"  (engine's dot alone, x quantized before: {prequantized_us:.2f})" if prequantized_us else ""
        print(f"{name + ':' + kind:>15} {floor:7.2f} {engine_us:7.2f} {best['us']:8.2f} {engine_us / best['us']:5.2f}  {tiles:<18} "
              f"{chosen_us:7.2f} {best['rel_err']:8.1e}{pre}", flush=True)
        del ws
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
