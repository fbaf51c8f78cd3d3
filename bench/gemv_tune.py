"""Times the skinny-matmul Triton kernel (worker/embedded/kernels/gemv.py) against
torch's F.linear (cuBLAS) for decode shapes, over a small grid of tile configurations,
timed inside a CUDA graph (no launch overhead) that cycles through enough copies of the
weight to overflow the 50 MB L2 cache (inside a model every weight comes from HBM; a
repeated call on one weight would read it from L2), and checks it against a float64
reference. Prints a table and writes JSON.

    python -m bench.gemv_tune --out gemv_tune.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
import triton.testing

from worker.embedded.kernels.fused import silu_and_mul
from worker.embedded.kernels.gemv import gemv

SHAPES = {  # name: (N, K)
    "1b.qkv": (3072, 2048), "1b.o": (2048, 2048), "1b.gate_up": (16384, 2048), "1b.down": (2048, 8192),
    "8b.qkv": (6144, 4096), "8b.o": (4096, 4096), "8b.gate_up": (28672, 4096), "8b.down": (4096, 14336),
    "135m.qkv": (960, 576), "135m.gate_up": (3072, 576),
    "1b.lm_head": (49152, 2048), "8b.lm_head": (49152, 4096),  # the SmolLM2 tokenizer's vocabulary
}


def bench(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median") * 1000


def sweep(configs, rows_per_block: int, run) -> dict:
    """The fastest config; `run(bn, bk, nw, ns)` -> (us, rel_err). rows_per_block: weight
    rows a program reads per block_n (2 when gated)."""
    best = None
    for bn, bk, nw, ns in configs:
        if (rows_per_block * bn + 16) * bk * 2 * ns > 200_000:  # shared memory of the pipelined tiles
            continue
        us, err = run(bn, bk, nw, ns)
        if best is None or us < best["us"]:
            best = {"block_n": bn, "block_k": bk, "warps": nw, "stages": ns, "us": us, "rel_err": err}
    return best


def cfg(b: dict) -> str:
    return f"{b['block_n']}/{b['block_k']}/{b['warps']}/{b['stages']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--gated", action="store_true", help="time the gate_up shapes with SiLU(gate) * up after them, fused and not")
    ap.add_argument("--block-n", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--block-k", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--out", default="gemv_tune.json")
    args = ap.parse_args()
    configs = list(itertools.product(args.block_n, args.block_k, args.warps, args.stages))
    results = []
    for name, M in itertools.product(args.shapes, args.rows):
        N, K = SHAPES[name]
        copies = max(2, -(-256 * 2**20 // (N * K * 2)))
        ws = [torch.randn(N, K, device="cuda").to(torch.bfloat16) * 0.02 for _ in range(copies)]
        w = ws[0]
        x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
        gated = args.gated and "gate_up" in name
        post = silu_and_mul if gated else (lambda y: y)
        ref = x.double() @ w.double().T
        if gated:
            g, u = ref.chunk(2, dim=-1)
            ref = F.silu(g) * u
        torch_us = bench(lambda: [post(F.linear(x, wi)) for wi in ws]) / copies

        def plain(bn, bk, nw, ns):
            err = ((post(gemv(x, w, None, bn, bk, nw, ns)).double() - ref).norm() / ref.norm()).item()
            return bench(lambda: [post(gemv(x, wi, None, bn, bk, nw, ns)) for wi in ws]) / copies, err

        best = sweep(configs, 1, plain)
        floor_us = N * K * 2 / 4.15e12 * 1e6  # the copy bandwidth decode_latency measured on an H200
        row = {"shape": name, "rows": M, "N": N, "K": K, "torch_us": torch_us, "floor_us": floor_us, "best": best}
        line = (f"{name:>12} M={M:<2} torch {torch_us:7.2f} us  gemv {best['us']:7.2f} us ({torch_us / best['us']:.2f}x)  "
                f"floor {floor_us:6.2f}  cfg {cfg(best)}  rel err {best['rel_err']:.1e}")
        if gated:
            def fused(bn, bk, nw, ns):
                y = gemv(x, w, None, bn, bk, nw, ns, gated=True)
                exact = torch.equal(y, silu_and_mul(gemv(x, w, None, bn, bk, nw, ns)))
                err = ((y.double() - ref).norm() / ref.norm()).item() if exact else float("inf")
                return bench(lambda: [gemv(x, wi, None, bn, bk, nw, ns, gated=True) for wi in ws]) / copies, err

            row["gated"] = g = sweep(configs, 2, fused)
            line += f"  | gated {g['us']:7.2f} us ({best['us'] / g['us']:.2f}x of gemv+silu) cfg {cfg(g)} rel err {g['rel_err']:.1e}"
        results.append(row)
        print(line, flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
