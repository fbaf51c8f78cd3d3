"""Batch-1 steps on the CUDA cores, checked on a GPU (KernelConfig.one_row_matmul "fma"
and fused_norm; kernels/gemv.py's gemv_fma).

1. The kernel at the engine's tiles on real projection shapes: gemv_fma given a RowNorm
   (the RMSNorm in its prologue) against the RMSNorm kernel then gemv_fma, bit for bit,
   for the output and the residual stream's next value; 16-bit weights, gated and not,
   and FP8 weights.
2. The engine: the same random weights served one request at a time (every decode step
   one row) with the norm fused and not (tokens and log-probabilities must be identical),
   and with the tensor-core kernels (agreement reported: their sums round differently).
Prints a table and writes JSON; exits non-zero when a must-be-identical pair differs.

    python -m bench.one_row_check --shape llama-3.2-1b --out one_row_check.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from bench.shapes import SHAPES, model_config
from inflight.sampling_params import SamplingParams
from worker.embedded.engine import EmbeddedEngine
from worker.embedded.kernels.fused import add_rms_norm
from worker.embedded.kernels.gemv import gemv_fma, gemv_fma_config
from worker.embedded.quant import FP8, RowNorm, quantize_rows
from worker.engine_api import EngineConfig, KernelConfig, KvCacheConfig


def kernel_cases(shape: str) -> list[dict]:
    s = SHAPES[shape]
    h, i = s["hidden_size"], s["intermediate_size"]
    qkv = (s["num_attention_heads"] + 2 * s["num_key_value_heads"]) * s["head_dim"]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, h, device="cuda", generator=g).to(torch.bfloat16)
    res = torch.randn(1, h, device="cuda", generator=g).to(torch.bfloat16)
    nw = (torch.rand(h, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    out = []
    for name, n, gated, fp8 in (("qkv", qkv, False, False), ("gate_up", i, True, False), ("gate_up", 2 * i, False, False),
                                ("qkv", qkv, False, True), ("gate_up", 2 * i, False, True)):
        rows = 2 * n if gated else n
        w = (torch.randn(rows, h, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        scale = None
        if fp8:
            w, scale = quantize_rows(w, FP8)
            scale = scale[:, 0].contiguous()
        bn, bk, nw_, unroll, acc = gemv_fma_config(n, h, w.element_size(), gated=gated)
        kw = dict(block_n=bn, block_k=bk, num_warps=nw_, unroll=unroll, acc_2d=acc, gated=gated)
        for with_res in (True, False):
            r = res if with_res else None
            normed, res0 = add_rms_norm(x, nw, 1e-5, r)
            res_out = torch.empty_like(x) if with_res else None
            fused = gemv_fma(RowNorm(x, r, nw, 1e-5, res_out), w, scale, **kw)
            plain = gemv_fma(normed, w, scale, **kw)
            out.append({"projection": name, "n": n, "k": h, "gated": gated, "weights": "fp8" if fp8 else "bf16",
                        "residual": with_res, "output_equal": torch.equal(fused, plain),
                        "residual_equal": torch.equal(res_out, res0) if with_res else None})
    return out


def generate(shape: str, kernels: KernelConfig, quantization: str, prompts: list[list[int]], n: int):
    torch.manual_seed(0)  # the same random weights in every engine
    engine = EmbeddedEngine(EngineConfig(device="cuda", dtype="bfloat16", max_seq_len=1024, quantization=quantization,
                                         kernels=kernels, kv_cache=KvCacheConfig(max_tokens=8192)), model_config(shape))
    weights_sum = float(sum(p.float().sum() for p in engine.model.parameters()))
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=1)
    tokens, logprobs = [], []
    for i, p in enumerate(prompts):  # one at a time: every decode step is one row
        engine.submit(f"r{i}", p, params)
        t, lp = [], []
        while engine.has_work():
            for o in engine.step():
                t += o.new_token_ids
                lp += [d.logprob for d in (o.logprobs or [])]
        tokens.append(t)
        logprobs.append(lp)
    del engine
    torch.cuda.empty_cache()
    return tokens, logprobs, weights_sum


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--quantization", nargs="+", default=["none", "fp8"])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--out", default="one_row_check.json")
    args = ap.parse_args()
    ok = True
    kernels = kernel_cases(args.shape)
    print(f"{args.shape} on {torch.cuda.get_device_name()}: the RMSNorm in gemv_fma's prologue against the norm kernel")
    for c in kernels:
        print(f"  {c['projection']:>8} {c['weights']} n={c['n']:<6} gated={c['gated']!s:<5} residual={c['residual']!s:<5} "
              f"output equal {c['output_equal']}  residual equal {c['residual_equal']}")
        ok &= c["output_equal"] and c["residual_equal"] in (True, None)
    g = torch.Generator().manual_seed(1)
    vocab = model_config(args.shape).vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (7, 64, 301)]
    engines = []
    for quant in args.quantization:
        runs = {name: generate(args.shape, k, quant, prompts, args.new_tokens) for name, k in (
            ("fma, norm fused", KernelConfig()), ("fma, norm kernel", KernelConfig(fused_norm=False)),
            ("dot", KernelConfig(one_row_matmul="dot")))}
        base_t, base_lp, base_w = runs["fma, norm fused"]
        for name, (t, lp, w) in runs.items():
            same_tokens = t == base_t
            same_lp = lp == base_lp
            agree = [next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(t, base_t)]
            row = {"quantization": quant, "variant": name, "weights_equal": w == base_w, "tokens_equal": same_tokens,
                   "logprobs_equal": same_lp, "tokens_agreeing_before_first_difference": agree}
            engines.append(row)
            print(f"  engine {quant:>5} {name:>17}: same weights {w == base_w}, tokens equal {same_tokens}, "
                  f"logprobs equal {same_lp}, agreeing tokens {agree} of {args.new_tokens}")
        ok &= engines[-2]["tokens_equal"] and engines[-2]["logprobs_equal"] and engines[-2]["weights_equal"]
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "args": vars(args), "kernels": kernels, "engines": engines,
                   "ok": ok}, f, indent=2)
    print("ok" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
