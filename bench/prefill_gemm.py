"""A mixed step's matmuls by token count: whether their cost must be a staircase.

A mixed step of the 8B shape is mostly its four projections a layer, and the engine's
graph sizes follow their cost: run 25 found 512 tokens at 11.5 ms and 640 at 14.6-15.1,
with 448 slower than 512 (dropped at start-up), so a step that cannot take 512 tokens
falls to 384 and leaves 2-3 ms of the step target unused. If some BLAS choice makes the
cost grow with the tokens rather than by 128-token steps, graphs every 64 tokens would
fill the target (bench.step_sim: TTFT p99 161 -> 119 ms at a 14 ms target).

This times one layer's qkv, o, gate_up and down matmuls (bf16, the layer's real shapes,
weights too large for L2) at each token count, under each BLAS library torch can prefer
(`torch.backends.cuda.preferred_blas_library`): "default" is the baseline of the same run.
It prints ms a layer, the step's matmuls (times the layers) and TFLOP/s, and each backend's
time over the baseline's, and writes JSON.

    python -m bench.prefill_gemm --shape llama-3-8b --tokens 384 448 512 576 640 704 768 --out prefill_gemm.json

Without a GPU it runs the same on the CPU with every dimension divided by --cpu-divide, as a
check that it runs (the times then say nothing about a GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.shapes import SHAPES, model_config

BACKENDS = ("default", "cublaslt")  # default: cuBLAS, torch's choice


def projections(name: str, divide: int = 1) -> dict[str, tuple[int, int]]:
    """(N, K) of each projection of a layer of the shape: y [T, N] = x [T, K] @ W.T."""
    cfg = model_config(name)
    h, i = cfg.hidden_size // divide, cfg.intermediate_size // divide
    q, kv = cfg.num_heads * cfg.head_dim // divide, cfg.num_kv_heads * cfg.head_dim // divide
    return {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * i, h), "down": (h, i)}


def layer_ms(weights: dict[str, torch.Tensor], xs: dict[str, torch.Tensor], repeats: int, cuda: bool) -> float:
    """The median time of one pass over the layer's four matmuls, ms."""
    def one() -> None:
        for name, w in weights.items():
            torch.mm(xs[name], w.t())

    for _ in range(3):
        one()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            one()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            one()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 320, 384, 448, 512, 576, 640, 704, 768, 896, 1024],
                    help="the step's token count (rows of x)")
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                    help="BLAS libraries torch may prefer; 'default' (torch's own choice) is the baseline")
    ap.add_argument("--repeats", type=int, default=20, help="timed passes a point (the median is reported)")
    ap.add_argument("--cpu-divide", type=int, default=16, help="without a GPU: every dimension divided by this")
    ap.add_argument("--out", default="prefill_gemm.json")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    divide = 1 if cuda else args.cpu_divide
    shapes = projections(args.shape, divide)
    layers = model_config(args.shape).num_layers
    backends = args.backends if cuda else ["default"]  # the library choice is CUDA's
    gen = torch.Generator(device=device).manual_seed(0)
    weights = {name: torch.randn(n, k, generator=gen, device=device, dtype=dtype) / k**0.5 for name, (n, k) in shapes.items()}
    flops_per_token = 2 * sum(n * k for n, k in shapes.values())
    where = torch.cuda.get_device_name() if cuda else f"CPU, dimensions / {divide}"
    rows = []
    for backend in backends:
        if cuda:
            torch.backends.cuda.preferred_blas_library(backend)
        for T in args.tokens:
            rows_t = max(1, T // divide)
            xs = {name: torch.randn(rows_t, k, generator=gen, device=device, dtype=dtype) for name, (_, k) in shapes.items()}
            ms = layer_ms(weights, xs, args.repeats, cuda)
            rows.append({"backend": backend, "tokens": T, "layer_ms": ms, "step_matmul_ms": ms * layers,
                         "tflops": flops_per_token * rows_t / (ms / 1000) / 1e12})
    if cuda:
        torch.backends.cuda.preferred_blas_library("default")
    base = {r["tokens"]: r["layer_ms"] for r in rows if r["backend"] == "default"}
    print(f"{args.shape}: one layer's qkv, o, gate_up and down matmuls, {str(dtype).removeprefix('torch.')}, {where}; "
          f"step = {layers} layers")
    print(f"{'backend':>9} {'tokens':>6} {'ms a layer':>10} {'step ms':>8} {'TFLOP/s':>8} {'vs default':>10} {'ms / 64 tokens more':>19}")
    last: dict[str, tuple[int, float]] = {}
    for r in rows:
        r["vs_default"] = r["layer_ms"] / base[r["tokens"]]
        prev = last.get(r["backend"])
        step = "" if prev is None else f"{(r['step_matmul_ms'] - prev[1]) * 64 / (r['tokens'] - prev[0]):19.2f}"
        last[r["backend"]] = (r["tokens"], r["step_matmul_ms"])
        print(f"{r['backend']:>9} {r['tokens']:6d} {r['layer_ms']:10.3f} {r['step_matmul_ms']:8.2f} {r['tflops']:8.1f} "
              f"{r['vs_default']:10.3f} {step}")
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "device": where, "shapes": shapes, "layers": layers, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
