"""Batch-1 steps on the CUDA cores (KernelConfig.one_row_matmul "fma", kernels/gemv.py's
gemv_fma), checked on a GPU through the engine: the same random weights served one request
at a time (every decode step one row), twice on the CUDA cores (tokens and log-probabilities
must be identical: the kernel is deterministic) and once on the tensor-core kernels
(agreement reported: their sums round differently, so greedy tokens may part after a near-tie).
bench/gpu_reference_check.py checks float32 against transformers; this checks the 16-bit and
FP8 paths that float32 does not take. Prints a table and writes JSON; exits non-zero when the
two CUDA-core runs differ.

    python -m bench.one_row_check --shape smollm2-135m --out one_row_check.json
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


def generate(shape: str, kernels: KernelConfig, quantization: str, prompts: list[list[int]], n: int):
    cfg = model_config(shape)
    engine = EmbeddedEngine(EngineConfig(device="cuda", dtype="bfloat16", max_seq_len=1024, quantization=quantization,
                                         kernels=kernels, kv_cache=KvCacheConfig(max_tokens=8192)), cfg,
                            random_weights(cfg))  # the same seeded weights in every engine, scaled to move every layer
    with torch.no_grad():
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
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--quantization", nargs="+", default=["none", "fp8"])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--out", default="one_row_check.json")
    args = ap.parse_args()
    ok = True
    g = torch.Generator().manual_seed(1)
    vocab = model_config(args.shape).vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (7, 64, 301)]
    engines = []
    for quant in args.quantization:
        runs = {name: generate(args.shape, k, quant, prompts, args.new_tokens) for name, k in (
            ("fma", KernelConfig()), ("fma again", KernelConfig()), ("dot", KernelConfig(one_row_matmul="dot")))}
        base_t, base_lp, base_w = runs["fma"]
        for name, (t, lp, w) in runs.items():
            same_tokens = t == base_t
            same_lp = lp == base_lp
            agree = [next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(t, base_t)]
            row = {"quantization": quant, "variant": name, "weights_equal": w == base_w, "tokens_equal": same_tokens,
                   "logprobs_equal": same_lp, "tokens_agreeing_before_first_difference": agree}
            engines.append(row)
            print(f"  {args.shape} {quant:>5} {name:>9}: same weights {w == base_w}, tokens equal {same_tokens}, "
                  f"logprobs equal {same_lp}, agreeing tokens {agree} of {args.new_tokens}")
        ok &= engines[-2]["tokens_equal"] and engines[-2]["logprobs_equal"] and engines[-2]["weights_equal"]
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "args": vars(args), "engines": engines,
                   "ok": ok}, f, indent=2)
    print("ok" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
