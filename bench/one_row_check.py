"""Steps of few rows on the CUDA cores (KernelConfig.one_row_matmul "fma", kernels/gemv.py's
gemv_fma), checked on a GPU through the engine: the same random weights served --rows
requests at a time (every decode step that many rows; 1 by default), twice on the CUDA cores (tokens and log-probabilities
must be identical: the kernel is deterministic) and once on the tensor-core kernels
(agreement reported: their sums round differently, so greedy tokens may part after a near-tie),
with the largest log-probability difference while they agree.
bench/gpu_reference_check.py checks float32 against transformers; this checks the 16-bit and
FP8 paths that float32 does not take. Prints a table and writes JSON; exits non-zero when the
two CUDA-core runs differ.

    python -m bench.one_row_check --shape smollm2-135m --out one_row_check.json
    python -m bench.one_row_check --shape llama-3.2-1b --rows 2 --out two_row_check.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from bench.shapes import SHAPES, model_config, random_weights
from inflight.sampling_params import SamplingParams
from worker.embedded.engine import EmbeddedEngine
from worker.engine_api import EngineConfig, KernelConfig, KvCacheConfig


def generate(shape: str, kernels: KernelConfig, quantization: str, prompts: list[list[int]], n: int, rows: int):
    cfg = model_config(shape)
    engine = EmbeddedEngine(EngineConfig(device="cuda", dtype="bfloat16", max_seq_len=1024, quantization=quantization,
                                         kernels=kernels, kv_cache=KvCacheConfig(max_tokens=8192)), cfg,
                            random_weights(cfg))  # the same seeded weights in every engine, scaled to move every layer
    with torch.no_grad():
        weights_sum = float(sum(p.float().sum() for p in engine.model.parameters()))
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=1)
    tokens, logprobs = [], []
    for g in range(0, len(prompts), rows):  # `rows` at a time: every decode step has that many
        t, lp = {}, {}
        for i in range(g, g + rows):
            engine.submit(f"r{i}", prompts[i], params)
            t[f"r{i}"], lp[f"r{i}"] = [], []
        while engine.has_work():
            for o in engine.step():
                t[o.request_id] += o.new_token_ids
                lp[o.request_id] += [d.logprob for d in (o.logprobs or [])]
        tokens += t.values()
        logprobs += lp.values()
    del engine
    torch.cuda.empty_cache()
    return tokens, logprobs, weights_sum


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--quantization", nargs="+", default=["none", "fp8"])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rows", type=int, default=1, help="requests served at once (the CUDA cores up to this many rows: fma_max_rows)")
    ap.add_argument("--out", default="one_row_check.json")
    args = ap.parse_args()
    ok = True
    g = torch.Generator().manual_seed(1)
    vocab = model_config(args.shape).vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (7, 64, 301) * args.rows]
    engines = []
    for quant in args.quantization:
        fma = KernelConfig(fma_max_rows=max(args.rows, KernelConfig.fma_max_rows))
        runs = {name: generate(args.shape, k, quant, prompts, args.new_tokens, args.rows) for name, k in (
            ("fma", fma), ("fma again", fma), ("dot", KernelConfig(one_row_matmul="dot")))}
        base_t, base_lp, base_w = runs["fma"]
        for name, (t, lp, w) in runs.items():
            same_tokens = t == base_t
            same_lp = lp == base_lp
            agree = [next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(t, base_t)]
            # over the tokens before the first difference, where both saw the same context
            lp_diff = max((abs(a - b) for x, y, n in zip(lp, base_lp, agree) for a, b in zip(x[:n], y[:n])), default=0.0)
            row = {"quantization": quant, "variant": name, "weights_equal": w == base_w, "tokens_equal": same_tokens,
                   "logprobs_equal": same_lp, "tokens_agreeing_before_first_difference": agree,
                   "max_logprob_diff_while_agreeing": lp_diff}
            engines.append(row)
            print(f"  {args.shape} {quant:>5} {name:>13}: same weights {w == base_w}, tokens equal {same_tokens}, "
                  f"logprobs equal {same_lp}, agreeing tokens {agree} of {args.new_tokens}, "
                  f"largest log-probability difference meanwhile {lp_diff:.4f}")
        again = next(r for r in engines[::-1] if r["variant"] == "fma again")
        ok &= again["tokens_equal"] and again["logprobs_equal"] and again["weights_equal"]
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "args": vars(args), "engines": engines,
                   "ok": ok}, f, indent=2)
    print("ok" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
