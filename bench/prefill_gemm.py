"""A mixed step's matmuls by token count: whether their cost must be a staircase.

A mixed step of the 8B shape is mostly its four projections a layer, and the engine's
graph sizes follow their cost: run 25 found 512 tokens at 11.5 ms and 640 at 14.6-15.1,
with 448 slower than 512 (dropped at start-up), so a step that cannot take 512 tokens
falls to 384 and leaves 2-3 ms of the step target unused. If some BLAS choice makes the
cost grow with the tokens rather than by 128-token steps, graphs every 64 tokens would
fill the target (bench.step_sim: TTFT p99 161 -> 119 ms at a 14 ms target).

This times one layer's qkv, o, gate_up and down matmuls (bf16, the layer's real shapes) at
each token count, each projection alone after a write that evicts L2 (as in a step, where
the layer's other weights pass between), under each BLAS library torch can prefer
(`torch.backends.cuda.preferred_blas_library`; "default" is the baseline of the same run)
and, as "triton", a candidate of ours: a tiled Triton matmul (persistent or one program a
tile, grouped tile order for L2) under each of TRITON_CONFIGS, the fastest config per
projection and token count reported with its name. The run's cost is wave quantization:
cuBLAS's tiles at 512 and 640 tokens leave part of the last wave of SMs idle (run 25: 662
and 650 TFLOP/s against 770 at 1,024), which smaller or other tiles may fill.
It prints ms a layer, the step's matmuls (times the layers) and TFLOP/s, and each backend's
time over the baseline's, and writes JSON with every projection's time under every config.

    python -m bench.prefill_gemm --shape llama-3-8b --tokens 384 448 512 576 640 704 768 --out prefill_gemm.json

Without a GPU it runs the same on the CPU with every dimension divided by --cpu-divide, as a
check that it runs (the times then say nothing about a GPU); the Triton candidate runs there
only in Triton's interpreter (TRITON_INTERPRET=1), which also checks it against torch.mm.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import triton
import triton.language as tl

from bench.shapes import SHAPES, model_config

BACKENDS = ("default", "cublaslt", "triton")  # default: cuBLAS, torch's choice

# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, persistent): Hopper's usual bf16 tiles, large to small
TRITON_CONFIGS = [
    (128, 256, 64, 3, 8, False), (128, 256, 64, 3, 8, True),
    (128, 128, 64, 4, 4, False), (128, 128, 64, 4, 8, True),
    (128, 128, 128, 3, 8, False), (256, 128, 64, 3, 8, False),
    (64, 256, 64, 4, 4, False), (64, 128, 64, 4, 4, True),
]


def config_name(cfg: tuple) -> str:
    bm, bn, bk, stages, warps, persistent = cfg
    return f"{bm}x{bn}x{bk} s{stages} w{warps}{' persistent' if persistent else ''}"


@triton.jit
def _tile_mm(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, tile,
             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """One BM x BN tile of y = x @ w.T; tiles run GROUP_M rows of tiles down a column of
    tiles before moving on, so that a wave shares w's tiles in L2. K is a multiple of BK."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pm = first_m + (tile % per_group) % group_rows
    pn = (tile % per_group) // group_rows
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    xs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    ws = w_ptr + rn[None, :] * stride_wn + rk[:, None]
    acc = tl.zeros([BM, BN], tl.float32)
    for _ in range(0, K, BK):
        a = tl.load(xs, mask=rm[:, None] < M, other=0.0)
        b = tl.load(ws, mask=rn[None, :] < N, other=0.0)
        acc = tl.dot(a, b, acc)
        xs += BK
        ws += BK
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _mm(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
        PROGRAMS: tl.constexpr, PERSISTENT: tl.constexpr):
    if PERSISTENT:  # PROGRAMS programs (one an SM) walk the tiles
        for tile in range(tl.program_id(0), tl.cdiv(M, BM) * tl.cdiv(N, BN), PROGRAMS):
            _tile_mm(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, tile, BM, BN, BK, GROUP_M)
    else:
        _tile_mm(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, tl.program_id(0), BM, BN, BK, GROUP_M)


def triton_mm(x: torch.Tensor, w: torch.Tensor, cfg: tuple) -> torch.Tensor:
    """y [M, N] = x [M, K] @ w [N, K].T under one of TRITON_CONFIGS."""
    bm, bn, bk, stages, warps, persistent = cfg
    M, K = x.shape
    N = w.shape[0]
    assert K % bk == 0 and x.stride(1) == 1 and w.stride(1) == 1
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    programs = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    grid = (min(tiles, programs) if persistent else tiles,)
    _mm[grid](x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0), BM=bm, BN=bn, BK=bk, GROUP_M=8,
              PROGRAMS=programs, PERSISTENT=persistent, num_stages=stages, num_warps=warps)
    return y


def projections(name: str, divide: int = 1) -> dict[str, tuple[int, int]]:
    """(N, K) of each projection of a layer of the shape: y [T, N] = x [T, K] @ W.T."""
    cfg = model_config(name)
    h, i = cfg.hidden_size // divide, cfg.intermediate_size // divide
    q, kv = cfg.num_heads * cfg.head_dim // divide, cfg.num_kv_heads * cfg.head_dim // divide
    return {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * i, h), "down": (h, i)}


def proj_ms(fn, repeats: int, cuda: bool, flush: torch.Tensor) -> float:
    """The median time of fn() (one projection's matmul), ms, each time after a write of
    `flush` has evicted L2 of its weights."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        flush.zero_()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 320, 384, 448, 512, 576, 640, 704, 768, 896, 1024],
                    help="the step's token count (rows of x)")
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                    help="BLAS libraries torch may prefer, and our Triton candidate; 'default' (torch's own choice) "
                         "is the baseline")
    ap.add_argument("--repeats", type=int, default=20, help="timed passes a point (the median is reported)")
    ap.add_argument("--cpu-divide", type=int, default=16, help="without a GPU: every dimension divided by this")
    ap.add_argument("--out", default="prefill_gemm.json")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    divide = 1 if cuda else args.cpu_divide
    shapes = projections(args.shape, divide)
    layers = model_config(args.shape).num_layers
    # The library choice is CUDA's; Triton kernels run on the CPU only in the interpreter.
    cpu_only = {"cublaslt"} | (set() if os.environ.get("TRITON_INTERPRET") == "1" else {"triton"})
    backends = args.backends if cuda else [b for b in args.backends if b not in cpu_only]
    if "default" not in backends:
        raise SystemExit("--backends needs 'default': it is the baseline")
    if set(args.backends) - set(backends):
        print(f"left out without a GPU: {', '.join(sorted(set(args.backends) - set(backends)))} "
              f"(the Triton candidate runs on the CPU with TRITON_INTERPRET=1)")
    gen = torch.Generator(device=device).manual_seed(0)
    weights = {name: torch.randn(n, k, generator=gen, device=device, dtype=dtype) / k**0.5 for name, (n, k) in shapes.items()}
    flush = torch.empty(256 * 2**20 // 4 if cuda else 1, device=device, dtype=torch.float32)  # 256 MiB: past any L2
    flops_per_token = 2 * sum(n * k for n, k in shapes.values())
    where = torch.cuda.get_device_name() if cuda else f"CPU, dimensions / {divide}"
    xs = {T: {name: torch.randn(max(1, T // divide), k, generator=gen, device=device, dtype=dtype)
              for name, (_, k) in shapes.items()} for T in args.tokens}
    configs = [c for c in TRITON_CONFIGS if all(k % c[2] == 0 for _, k in shapes.values())]
    checks = []  # the Triton matmul against torch's, each config and projection, at the first token count
    rows = []
    for backend in backends:
        if cuda and backend != "triton":
            torch.backends.cuda.preferred_blas_library(backend)
        for T in args.tokens:
            per = {}
            for name, w in weights.items():
                x = xs[T][name]
                if backend != "triton":
                    per[name] = {"ms": proj_ms(lambda: torch.mm(x, w.t()), args.repeats, cuda, flush)}
                    continue
                times = {}
                ref = torch.mm(x.float(), w.float().t()) if T == args.tokens[0] else None
                for cfg in configs:
                    if ref is not None:
                        err = ((triton_mm(x, w, cfg).float() - ref).norm() / ref.norm()).item()
                        checks.append({"config": config_name(cfg), "projection": name, "relative_error": err})
                    times[config_name(cfg)] = proj_ms(lambda: triton_mm(x, w, cfg), args.repeats, cuda, flush)
                best = min(times, key=times.get)
                per[name] = {"ms": times[best], "config": best, "by_config": times}
            ms = sum(v["ms"] for v in per.values())
            rows.append({"backend": backend, "tokens": T, "layer_ms": ms, "step_matmul_ms": ms * layers,
                         "tflops": flops_per_token * max(1, T // divide) / (ms / 1000) / 1e12, "projections": per})
    if cuda:
        torch.backends.cuda.preferred_blas_library("default")
    worst = max((c["relative_error"] for c in checks), default=0.0)
    base = {r["tokens"]: r for r in rows if r["backend"] == "default"}
    print(f"{args.shape}: one layer's qkv, o, gate_up and down matmuls, {str(dtype).removeprefix('torch.')}, {where}; "
          f"step = {layers} layers; each projection timed alone, L2 evicted")
    if checks:
        print(f"triton against torch.mm (float32 reference): largest relative error {worst:.2e} "
              f"over {len(checks)} config x projection checks")
    names = list(shapes)
    print(f"{'backend':>9} {'tokens':>6} {'ms a layer':>10} {'step ms':>8} {'TFLOP/s':>8} {'vs default':>10} "
          f"{'ms / 64 more':>12}  " + "  ".join(f"{n + ' (vs)':>14}" for n in names))
    last: dict[str, tuple[int, float]] = {}
    for r in rows:
        b = base[r["tokens"]]
        r["vs_default"] = r["layer_ms"] / b["layer_ms"]
        prev = last.get(r["backend"])
        step = "" if prev is None else f"{(r['step_matmul_ms'] - prev[1]) * 64 / (r['tokens'] - prev[0]):12.2f}"
        last[r["backend"]] = (r["tokens"], r["step_matmul_ms"])
        cols = "  ".join(f"{r['projections'][n]['ms']:7.3f} ({r['projections'][n]['ms'] / b['projections'][n]['ms']:4.2f})"
                         for n in names)
        print(f"{r['backend']:>9} {r['tokens']:6d} {r['layer_ms']:10.3f} {r['step_matmul_ms']:8.2f} {r['tflops']:8.1f} "
              f"{r['vs_default']:10.3f} {step:>12}  {cols}")
    for r in rows:
        if r["backend"] == "triton":
            print(f"triton {r['tokens']:5d} tokens, fastest configs: "
                  + "; ".join(f"{n} {r['projections'][n]['config']}" for n in names))
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "device": where, "shapes": shapes, "layers": layers, "rows": rows,
                   "triton_checks": checks}, f, indent=1)
    if worst > 2e-2:
        raise SystemExit(f"the Triton matmul is wrong: relative error {worst:.2e} against torch.mm")


if __name__ == "__main__":
    main()
