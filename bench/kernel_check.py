"""Checks and times the paged-decode and paged varlen Triton kernels (and the fused ones) on a GPU against a float64 reference,
on fresh random inputs each case, with the output poisoned (NaN) before every run.
Prints a table and writes JSON.

    python -m bench.kernel_check --out kernel_check.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton.testing

from worker.embedded.kernels.paged_decode import num_splits, paged_decode_attention, paged_decode_reference

CASES = [  # (batch, Hq, Hkv, head_dim, block_size, max_context, dtype)
    (1, 32, 8, 64, 32, 200, torch.bfloat16),  # Llama-3.2-1B, a short chat
    (1, 32, 8, 64, 32, 1024, torch.bfloat16),  # Llama-3.2-1B
    (1, 32, 8, 128, 32, 8000, torch.bfloat16),  # Llama-3-8B heads, long context
    (8, 32, 8, 64, 32, 2048, torch.bfloat16),
    (32, 32, 8, 128, 16, 4096, torch.bfloat16),  # Llama-3-8B heads
    (64, 9, 3, 64, 32, 1024, torch.float16),  # SmolLM2-135M
    (7, 16, 16, 64, 16, 333, torch.float32),
]


def check_fused(dtype: torch.dtype) -> list[dict]:
    """The fused elementwise kernels against their PyTorch formulation (the CPU path's)."""
    import torch.nn.functional as F

    from worker.embedded.kernels.fused import add_rms_norm, rope_and_cache, silu_and_mul

    g = torch.Generator(device="cuda").manual_seed(7)
    rows = []

    def record(name, ours, ref, us):
        rel = ((ours.double() - ref.double()).norm() / ref.double().norm()).item()
        rows.append({"kernel": name, "dtype": str(dtype).removeprefix("torch."), "rel_err_vs_torch": rel,
                     "nan": bool(torch.isnan(ours).any()), "us": us})

    T, N = 64, 2048
    x = torch.randn(T, N, generator=g, device="cuda").to(dtype)
    r = torch.randn(T, N, generator=g, device="cuda").to(dtype)
    w = torch.randn(N, generator=g, device="cuda").to(dtype)
    h = x + r
    hf = h.float()
    ref = w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    out, res = add_rms_norm(x, w, 1e-5, r)
    us = 1000 * triton.testing.do_bench(lambda: add_rms_norm(x, w, 1e-5, r), return_mode="median")
    record("add_rms_norm", out, ref, us)
    record("add_rms_norm.residual", res, h, us)

    gu = torch.randn(T, 2 * 8192, generator=g, device="cuda").to(dtype)
    gate, up = gu.chunk(2, dim=-1)
    us = 1000 * triton.testing.do_bench(lambda: silu_and_mul(gu), return_mode="median")
    record("silu_and_mul", silu_and_mul(gu), F.silu(gate) * up, us)

    hq, hkv, d, bs, nblocks = 32, 8, 64, 32, 16
    qkv = torch.randn(T, (hq + 2 * hkv) * d, generator=g, device="cuda").to(dtype)
    q, k, v = (t.view(T, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    pos = torch.randint(0, 4096, (T,), generator=g, device="cuda")
    slots = torch.randperm(nblocks * bs, generator=g, device="cuda")[:T]
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    freqs = torch.outer(torch.arange(4096, device="cuda").float(), inv)
    cos, sin = freqs.cos(), freqs.sin()

    def rot(x):
        c, s = cos[pos][:, None], sin[pos][:, None]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    q_ref, k_ref, v_ref = rot(q), rot(k), v.clone()
    kc = torch.full((nblocks, bs, hkv, d), float("nan"), device="cuda", dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    rope_and_cache(q, k, v, cos, sin, pos, slots, kc, vc)
    record("rope_and_cache.q", q, q_ref, 0.0)
    record("rope_and_cache.k", k, k_ref, 0.0)
    record("rope_and_cache.k_cache", kc.view(-1, hkv, d)[slots], k_ref, 0.0)
    record("rope_and_cache.v_cache", vc.view(-1, hkv, d)[slots], v_ref, 0.0)

    if dtype != torch.float32:  # the skinny matmul takes 16-bit only on a GPU (launched with PDL on Hopper)
        from worker.embedded.kernels.gemv import gemv, gemv_config, gemv_gated_config

        for rows_, (n, k) in ((1, (3072, 2048)), (8, (2048, 8192)), (3, (16384, 2048))):
            xs = torch.randn(rows_, k, generator=g, device="cuda").to(dtype)
            wm = (torch.randn(n, k, generator=g, device="cuda") / k**0.5).to(dtype)
            exact = xs.double() @ wm.double().T
            us = 1000 * triton.testing.do_bench(lambda: gemv(xs, wm, None, *gemv_config(n, k)), return_mode="median")
            record(f"gemv.{rows_}x{n}x{k} vs f64", gemv(xs, wm, None, *gemv_config(n, k)), exact, us)
            record(f"torch.{rows_}x{n}x{k} vs f64", F.linear(xs, wm), exact, 0.0)
        # gated (SiLU(gate) * up in the epilogue): Llama-3.2-1B's and SmolLM2's gate_up
        for rows_, (n, k) in ((1, (8192, 2048)), (5, (1536, 576))):
            xs = torch.randn(rows_, k, generator=g, device="cuda").to(dtype)
            wm = (torch.randn(2 * n, k, generator=g, device="cuda") / k**0.5).to(dtype)
            gate, up = (xs.double() @ wm.double().T).chunk(2, dim=-1)
            cfg = gemv_gated_config(n, k)
            ours = gemv(xs, wm, None, *cfg, gated=True)
            us = 1000 * triton.testing.do_bench(lambda: gemv(xs, wm, None, *cfg, gated=True), return_mode="median")
            record(f"gemv.gated.{rows_}x{n}x{k} vs f64", ours, F.silu(gate) * up, us)
            unfused = silu_and_mul(gemv(xs, wm, None, *cfg))
            rows[-1]["equals_unfused"] = torch.equal(ours, unfused)
    return rows


VARLEN_CASES = [  # (query lengths, context lengths, Hq, Hkv, head_dim, block_size, dtype): decodes, fresh and cached prefills
    ([1] * 32 + [512, 300], [700] * 32 + [512, 1800], 32, 8, 64, 32, torch.bfloat16),  # Llama-3.2-1B, a mixed step
    ([1] * 8 + [1024], [4000] * 8 + [3000], 32, 8, 128, 16, torch.bfloat16),  # Llama-3-8B heads
    ([17, 1, 64], [17, 90, 200], 9, 3, 64, 32, torch.float16),  # SmolLM2-135M: a padded group
    ([33, 1], [100, 333], 16, 16, 64, 16, torch.float32),
]


def check_paged_varlen() -> list[dict]:
    """The paged varlen kernel (mixed steps) against its float64 reference, launched over
    a tile map sized for twice the used tiles, as a graph of a larger step would."""
    from worker.embedded.kernels.paged_varlen import block_q, paged_varlen_attention, paged_varlen_reference, tile_map

    from worker.embedded.attention import to_cache

    rows = []
    # Each 16-bit case over its own cache, and the bf16 ones over an FP8 cache too
    # (kv_cache.dtype fp8: the reference reads the same float8 values widened).
    cases = [(c, kv) for c in VARLEN_CASES for kv in ("auto", "fp8") if kv == "auto" or c[-1] == torch.bfloat16]
    for (q_lens, ctx, hq, hkv, d, bs, dtype), kv in cases:
        gen = torch.Generator(device="cuda").manual_seed(len(q_lens))
        S, T = len(q_lens), sum(q_lens)
        width = -(-max(ctx) // bs)
        kc, vc = (torch.randn(S * width + 1, bs, hkv, d, generator=gen, device="cuda").to(dtype) for _ in range(2))
        if kv == "fp8":
            kc, vc = to_cache(kc, torch.float8_e4m3fn), to_cache(vc, torch.float8_e4m3fn)
        tables = torch.randperm(S * width + 1, generator=gen, device="cuda")[: S * width].reshape(S, width)
        q = torch.randn(T, hq, d, generator=gen, device="cuda").to(dtype)
        bq = block_q(hq // hkv)
        used = len(tile_map(q_lens, bq)[0])
        tile_seq, tile_q = (torch.from_numpy(a).cuda() for a in tile_map(q_lens, bq, 2 * used))
        starts = [sum(q_lens[:i]) for i in range(S)]
        seq = [torch.tensor(x, device="cuda") for x in (starts, q_lens, ctx)]
        out = torch.full_like(q, float("nan"))
        run = lambda: paged_varlen_attention(q, kc, vc, out, tile_seq, tile_q, *seq, tables, d ** -0.5)  # noqa: E731
        run()
        ref = paged_varlen_reference(q, kc.to(dtype), vc.to(dtype), *seq, tables, d ** -0.5)
        ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
        rows.append({"queries": T, "sequences": S, "heads": f"{hq}/{hkv}", "head_dim": d, "block": bs, "max_ctx": max(ctx),
                     "dtype": str(dtype).removeprefix("torch.") + ("/fp8kv" if kv == "fp8" else ""), "rel_err": ((out.double() - ref).norm() / ref.norm()).item(),
                     "nan": bool(torch.isnan(out).any()), "us": ms * 1000})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="kernel_check.json")
    args = ap.parse_args()
    rows = []
    from worker.embedded.attention import to_cache

    fp8 = torch.float8_e4m3fn
    cases = [(c, sp, kv) for c in CASES for sp in (1, None) for kv in ("auto", "fp8") if kv == "auto" or c[-1] == torch.bfloat16]
    for (B, hq, hkv, d, bs, max_ctx, dtype), splits, kv in cases:
        gen = torch.Generator(device="cuda").manual_seed(hash((B, hq, d)) % 2**31)
        ctx = torch.randint(1, max_ctx + 1, (B,), generator=gen, device="cuda", dtype=torch.int32)
        ctx[0] = max_ctx
        blocks_per_seq = -(-max_ctx // bs)
        num_blocks = B * blocks_per_seq + 3
        kc = torch.randn(num_blocks, bs, hkv, d, generator=gen, device="cuda").to(dtype)
        vc = torch.randn(num_blocks, bs, hkv, d, generator=gen, device="cuda").to(dtype)
        tables = torch.randperm(num_blocks, generator=gen, device="cuda")[: B * blocks_per_seq].reshape(B, blocks_per_seq).int()
        q = torch.randn(B, hq, d, generator=gen, device="cuda").to(dtype)
        if kv == "fp8":  # kv_cache.dtype fp8: the reference reads the same values widened
            kc, vc = to_cache(kc, fp8), to_cache(vc, fp8)
        out = torch.full_like(q, float("nan"))
        scale = d ** -0.5
        paged_decode_attention(q, kc, vc, tables, ctx, scale, out, splits)
        ref = paged_decode_reference(q, kc.to(dtype), vc.to(dtype), tables, ctx, scale)
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        ms = triton.testing.do_bench(lambda: paged_decode_attention(q, kc, vc, tables, ctx, scale, out, splits), warmup=25, rep=100,
                                     return_mode="median")
        rel_after = ((out.double() - ref).norm() / ref.norm()).item()  # after the timed launches (split counters reused)
        kv_bytes = 2 * int(ctx.sum()) * hkv * d * kc.element_size()
        used = splits or num_splits(B * hkv, torch.cuda.get_device_properties(0).multi_processor_count, blocks_per_seq * bs, max(64, bs))
        rows.append({"batch": B, "heads": f"{hq}/{hkv}", "head_dim": d, "block": bs, "max_ctx": max_ctx, "splits": used,
                     "dtype": str(dtype).removeprefix("torch.") + ("/fp8kv" if kv == "fp8" else ""), "rel_err": rel, "rel_err_after_timing": rel_after, "nan": bool(torch.isnan(out).any()),
                     "us": ms * 1000, "kv_GBps": kv_bytes / (ms / 1000) / 1e9})
    print(f"\npaged decode kernel on {torch.cuda.get_device_name()}")
    print(f"{'batch':>5} {'heads':>6} {'dim':>4} {'blk':>4} {'ctx':>5} {'splits':>6} {'dtype':>15} {'rel err':>9} {'after':>9} {'NaN':>4} {'us':>8} {'KV GB/s':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['heads']:>6} {r['head_dim']:>4} {r['block']:>4} {r['max_ctx']:>5} {r['splits']:>6} {r['dtype']:>15} "
              f"{r['rel_err']:>9.2e} {r['rel_err_after_timing']:>9.2e} {str(r['nan']):>4} {r['us']:>8.1f} {r['kv_GBps']:>8.0f}")
    varlen = check_paged_varlen()
    print(f"\n{'paged varlen: queries':>21} {'seqs':>4} {'heads':>6} {'dim':>4} {'ctx':>5} {'dtype':>15} {'rel err':>9} {'NaN':>4} {'us':>8}")
    for r in varlen:
        print(f"{r['queries']:>21} {r['sequences']:>4} {r['heads']:>6} {r['head_dim']:>4} {r['max_ctx']:>5} {r['dtype']:>15} "
              f"{r['rel_err']:>9.2e} {str(r['nan']):>4} {r['us']:>8.1f}")
    fused = check_fused(torch.bfloat16) + check_fused(torch.float32)
    print(f"\n{'fused kernel':>24} {'dtype':>9} {'rel err vs torch':>17} {'NaN':>4} {'us':>7}")
    for r in fused:
        print(f"{r['kernel']:>24} {r['dtype']:>9} {r['rel_err_vs_torch']:>17.2e} {str(r['nan']):>4} {r['us']:>7.1f}")
    with open(args.out, "w") as f:
        json.dump({"paged_decode": rows, "paged_varlen": varlen, "fused": fused}, f, indent=2)
    bad = [r for r in rows if r["nan"] or r["rel_err"] > (1e-2 if r["dtype"] != "float32" else 1e-5)]
    bad += [r for r in varlen if r["nan"] or r["rel_err"] > (1e-2 if r["dtype"] != "float32" else 1e-5)]
    bad += [r for r in fused if r["nan"] or r["rel_err_vs_torch"] > (1e-2 if r["dtype"] != "float32" else 1e-6)]
    if bad:
        sys.exit(f"kernel check FAILED: {bad}")


if __name__ == "__main__":
    main()
