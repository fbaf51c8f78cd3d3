"""Checks and times the paged-decode Triton kernel on a GPU against a float64 reference,
on fresh random inputs each case, with the output poisoned (NaN) before every run.
Prints a table and writes JSON.

    python bench/kernel_check.py --out kernel_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton.testing  # noqa: E402

from worker.embedded.kernels.paged_decode import paged_decode_attention, paged_decode_reference  # noqa: E402

CASES = [  # (batch, Hq, Hkv, head_dim, block_size, max_context, dtype)
    (1, 32, 8, 64, 32, 1024, torch.bfloat16),  # Llama-3.2-1B
    (8, 32, 8, 64, 32, 2048, torch.bfloat16),
    (32, 32, 8, 128, 16, 4096, torch.bfloat16),  # Llama-3-8B heads
    (64, 9, 3, 64, 32, 1024, torch.float16),  # SmolLM2-135M
    (7, 16, 16, 64, 16, 333, torch.float32),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="kernel_check.json")
    args = ap.parse_args()
    rows = []
    for B, hq, hkv, d, bs, max_ctx, dtype in CASES:
        gen = torch.Generator(device="cuda").manual_seed(hash((B, hq, d)) % 2**31)
        ctx = torch.randint(1, max_ctx + 1, (B,), generator=gen, device="cuda", dtype=torch.int32)
        ctx[0] = max_ctx
        blocks_per_seq = -(-max_ctx // bs)
        num_blocks = B * blocks_per_seq + 3
        kc = torch.randn(num_blocks, bs, hkv, d, generator=gen, device="cuda").to(dtype)
        vc = torch.randn(num_blocks, bs, hkv, d, generator=gen, device="cuda").to(dtype)
        tables = torch.randperm(num_blocks, generator=gen, device="cuda")[: B * blocks_per_seq].reshape(B, blocks_per_seq).int()
        q = torch.randn(B, hq, d, generator=gen, device="cuda").to(dtype)
        out = torch.full_like(q, float("nan"))
        scale = d ** -0.5
        paged_decode_attention(q, kc, vc, tables, ctx, scale, out)
        ref = paged_decode_reference(q, kc, vc, tables, ctx, scale)
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        ms = triton.testing.do_bench(lambda: paged_decode_attention(q, kc, vc, tables, ctx, scale, out), warmup=25, rep=100,
                                     return_mode="median")
        kv_bytes = 2 * int(ctx.sum()) * hkv * d * kc.element_size()
        rows.append({"batch": B, "heads": f"{hq}/{hkv}", "head_dim": d, "block": bs, "max_ctx": max_ctx,
                     "dtype": str(dtype).removeprefix("torch."), "rel_err": rel, "nan": bool(torch.isnan(out).any()),
                     "us": ms * 1000, "kv_GBps": kv_bytes / (ms / 1000) / 1e9})
    print(f"\npaged decode kernel on {torch.cuda.get_device_name()}")
    print(f"{'batch':>5} {'heads':>6} {'dim':>4} {'blk':>4} {'ctx':>5} {'dtype':>9} {'rel err':>9} {'NaN':>4} {'us':>8} {'KV GB/s':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['heads']:>6} {r['head_dim']:>4} {r['block']:>4} {r['max_ctx']:>5} {r['dtype']:>9} "
              f"{r['rel_err']:>9.2e} {str(r['nan']):>4} {r['us']:>8.1f} {r['kv_GBps']:>8.0f}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)
    bad = [r for r in rows if r["nan"] or r["rel_err"] > (1e-2 if r["dtype"] != "float32" else 1e-5)]
    if bad:
        sys.exit(f"kernel check FAILED: {bad}")


if __name__ == "__main__":
    main()
