"""Checks the embedded engine against transformers on a GPU, random weights of a real shape.

float32: greedy tokens must equal transformers'. bfloat16: first-step log-probabilities
of ours and of transformers-bf16 are compared with the float32 reference, and the greedy
tokens agreeing with it are counted. Prints a table and writes JSON.

    python -m bench.gpu_reference_check --shape llama-3.2-1b --out result.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.shapes import SHAPES, hf_llama, model_config
from inflight.sampling_params import SamplingParams
from worker.embedded.engine import EmbeddedEngine
from worker.engine_api import EngineConfig, KvCacheConfig


@torch.no_grad()
def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens (EOS ignored) and the first step's log-probabilities."""
    dev = next(model.parameters()).device
    res = model(torch.tensor([prompt], device=dev), use_cache=True)
    first = torch.log_softmax(res.logits[0, -1].float(), -1)
    out = []
    for _ in range(n):
        t = int(res.logits[0, -1].argmax())
        out.append(t)
        res = model(torch.tensor([[t]], device=dev), past_key_values=res.past_key_values, use_cache=True)
    return out, first


def ours(engine: EmbeddedEngine, prompts: list[list[int]], n: int):
    """All prompts in one batch; returns tokens and each first step's top-20 logprobs."""
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=20)
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.submit(rid, p, params)
    tokens = {rid: [] for rid in ids}
    first = {}
    while engine.has_work():
        for o in engine.step():
            tokens[o.request_id] += o.new_token_ids
            first.setdefault(o.request_id, o.logprobs[0])
    return [tokens[r] for r in ids], [first[r] for r in ids]


def agree(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default="gpu_reference_check.json")
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    torch.manual_seed(0)
    hf = hf_llama(args.shape)
    config = model_config(args.shape)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, shape["vocab_size"], (n,), generator=gen).tolist() for n in (7, 64, 301, 1000)]
    n = args.new_tokens
    kv = KvCacheConfig(tokens_per_block=32, max_tokens=16384)
    result = {"shape": args.shape, "device": torch.cuda.get_device_name(), "torch": torch.__version__, "prompts": [len(p) for p in prompts]}

    t0 = time.time()
    ref32 = [hf_greedy(hf, p, n) for p in prompts]
    engine = EmbeddedEngine(EngineConfig(device="cuda", dtype="float32", kv_cache=kv, max_seq_len=4096), config, hf.state_dict().items())
    tok32, _ = ours(engine, prompts, n)
    result["float32"] = {
        "tokens_equal": [a == b for a, (b, _) in zip(tok32, ref32)],
        "agree_prefix": [agree(a, b) for a, (b, _) in zip(tok32, ref32)],
    }
    del engine
    torch.cuda.empty_cache()

    hf = hf.to(torch.bfloat16)
    ref16 = [hf_greedy(hf, p, n) for p in prompts]
    engine = EmbeddedEngine(EngineConfig(device="cuda", dtype="bfloat16", kv_cache=kv, max_seq_len=4096), config, hf.state_dict().items())
    tok16, first16 = ours(engine, prompts, n)
    rows = []
    for i, ((r32_tok, r32_lp), (h16_tok, h16_lp), t16, f16) in enumerate(zip(ref32, ref16, tok16, first16)):
        ids = torch.tensor([t for t, _ in f16.top], device=r32_lp.device)
        ref = r32_lp[ids]
        ours_lp = torch.tensor([lp for _, lp in f16.top], device=ref.device)
        rows.append({
            "prompt_len": len(prompts[i]),
            "ours_bf16_rel_err": ((ours_lp - ref).norm() / ref.norm()).item(),
            "hf_bf16_rel_err": ((h16_lp[ids] - ref).norm() / ref.norm()).item(),
            "ours_bf16_agree_fp32": agree(t16, r32_tok),
            "hf_bf16_agree_fp32": agree(h16_tok, r32_tok),
            "ours_bf16_agree_hf_bf16": agree(t16, h16_tok),
        })
    result["bfloat16"] = rows

    # A first look at speed (bf16): decode tokens per second at batch 1 and 32.
    speed = {}
    for batch in (1, 32):
        ps = [torch.randint(0, shape["vocab_size"], (128,), generator=gen).tolist() for _ in range(batch)]
        engine.generate(ps[:1], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.generate(ps, SamplingParams(max_tokens=128, temperature=0, ignore_eos=True))
        torch.cuda.synchronize()
        speed[f"batch{batch}_tok_per_s"] = batch * 128 / (time.perf_counter() - t)
    result["speed_bf16_128in_128out"] = speed
    result["seconds"] = time.time() - t0

    print(f"\n{args.shape} on {result['device']}, torch {result['torch']}")
    print("float32 greedy == transformers:", result["float32"]["tokens_equal"], "agree prefix:", result["float32"]["agree_prefix"])
    print(f"{'prompt':>7} {'ours bf16 rel err':>18} {'hf bf16 rel err':>16} {'ours~fp32':>10} {'hf~fp32':>8} {'ours~hf16':>10}")
    for r in rows:
        print(f"{r['prompt_len']:>7} {r['ours_bf16_rel_err']:>18.2e} {r['hf_bf16_rel_err']:>16.2e} {r['ours_bf16_agree_fp32']:>10} "
              f"{r['hf_bf16_agree_fp32']:>8} {r['ours_bf16_agree_hf_bf16']:>10}")
    print("speed (bf16, reference attention, no CUDA graphs):", {k: round(v, 1) for k, v in speed.items()})
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
