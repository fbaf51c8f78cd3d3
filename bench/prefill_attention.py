"""Prefill attention of a step's fresh prompts: one varlen flash-attention call over the
packed rows (torch.nn.attention.varlen, the eager steps' choice) against our paged varlen
kernel reading the same K/V from a paged cache (kernels/paged_varlen.py: what mixed steps
run inside their CUDA graphs), in the same run, with the float64 result as the reference.
Times include the host (each call synchronized).

    python -m bench.prefill_attention --out prefill_attention.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from worker.embedded.attention import varlen_prefill
from worker.embedded.kernels.paged_varlen import block_q, paged_varlen_attention, tile_map

CASES = [  # (name, sequences, Hq, Hkv, head_dim)
    ("smollm2-135m", 16, 9, 3, 64),
    ("llama-3.2-1b", 1, 32, 8, 64),
    ("llama-3.2-1b", 16, 32, 8, 64),
    ("llama-3-8b", 16, 32, 8, 128),
]


def reference(q, k, v, lens, scale) -> torch.Tensor:
    out, start = [], 0
    group = q.shape[1] // k.shape[1]
    for n in lens:
        qs, ks, vs = (t[start:start + n].double() for t in (q, k, v))
        ks, vs = ks.repeat_interleave(group, 1), vs.repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vs))
        start += n
    return torch.cat(out)


def timed(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="prefill_attention.json")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, nseq, hq, hkv, d in CASES:
        lens = torch.randint(128, 1025, (nseq,), generator=gen, device="cuda").tolist()
        total = sum(lens)
        q = torch.randn(total, hq, d, generator=gen, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(total, hkv, d, generator=gen, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(total, hkv, d, generator=gen, device="cuda", dtype=torch.bfloat16)
        scale = d ** -0.5
        starts = [sum(lens[:i]) for i in range(nseq)]

        # The same K/V in a paged cache of 32-token blocks, in shuffled blocks.
        bs = 32
        nblocks = sum(-(-n // bs) for n in lens)
        perm = torch.randperm(nblocks, device="cuda")
        kc = torch.zeros(nblocks, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
        vc = torch.zeros_like(kc)
        width = max(-(-n // bs) for n in lens)
        tables = torch.zeros(nseq, width, dtype=torch.int32, device="cuda")
        at = 0
        for i, (s, n) in enumerate(zip(starts, lens)):
            blocks = perm[at : at + -(-n // bs)]
            at += len(blocks)
            tables[i, : len(blocks)] = blocks
            slots = blocks.repeat_interleave(bs)[:n] * bs + torch.arange(n, device="cuda") % bs
            kc.view(-1, hkv, d)[slots], vc.view(-1, hkv, d)[slots] = k[s : s + n], v[s : s + n]
        tile_seq, tile_q = (torch.from_numpy(a).cuda() for a in tile_map(lens, block_q(hq // hkv)))
        seq = [torch.tensor(x, dtype=torch.int32, device="cuda") for x in (starts, lens, lens)]

        def paged():
            return paged_varlen_attention(q, kc, vc, torch.empty_like(q), tile_seq, tile_q, *seq, tables, scale)

        cu_seq = torch.tensor([0] + [s + n for s, n in zip(starts, lens)], dtype=torch.int32, device="cuda")

        def varlen():
            return varlen_prefill(q, k, v, cu_seq, max(lens), scale)

        ref = reference(q, k, v, lens, scale)
        row = {"shape": name, "sequences": nseq, "tokens": total, "heads": f"{hq}/{hkv}", "head_dim": d}
        for label, fn in (("paged", paged), ("varlen", varlen)):
            out = fn()
            row[label] = {"ms": timed(fn), "rel_err": ((out.double() - ref).norm() / ref.norm()).item(), "nan": bool(out.isnan().any())}
        rows.append(row)
    print(f"\nprefill attention on {torch.cuda.get_device_name()}, bf16, torch {torch.__version__}")
    print(f"{'shape':>14} {'seqs':>4} {'tokens':>6} {'paged ms':>10} {'varlen ms':>9} {'paged/varlen':>12} {'err paged':>11} {'err varlen':>10}")
    for r in rows:
        p, v = r["paged"], r["varlen"]
        print(f"{r['shape']:>14} {r['sequences']:>4} {r['tokens']:>6} {p['ms']:>10.3f} {v['ms']:>9.3f} {p['ms'] / v['ms']:>11.2f}x "
              f"{p['rel_err']:>11.2e} {v['rel_err']:>10.2e}")
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=2)
    bad = [r for r in rows for k in ("paged", "varlen") if r[k]["nan"] or r[k]["rel_err"] > 1e-2]
    if bad:
        sys.exit(f"prefill attention check FAILED: {bad}")


if __name__ == "__main__":
    main()
