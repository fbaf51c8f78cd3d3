"""Capacity: how many sequences run at once in a fixed KV-cache memory budget, our paged
cache against Hugging Face transformers' contiguous caches on the same budget.

Ours is measured by running the workload through the engine with exactly that many bytes
of KV cache (`kv_cache.max_tokens`) and counting running sequences every step (mean and
peak), under both capacity policies; the mean counts the steps while requests wait for
room, when the cache is the limit (not the ramp-up or the last stragglers). transformers' number follows from how its caches
allocate, checked against a real `generate` in the same run (the bytes of the cache it
returns must equal the rule):
- DynamicCache, batched `generate`: every row of a batch holds the longest prompt of the
  batch plus the most new tokens of the batch (left padding, and rows run until the
  longest is done), so the largest batch whose padded cache fits the budget;
- StaticCache (what compiled / CUDA-graph generation uses): every row holds
  `max_cache_len` = the deployment's max_seq_len, whatever the request needs.

Workloads (seeded): "mixed" = the offline workload (prompts uniform in [128, 1024],
outputs uniform in [128, 512]); "shared-prefix" = one 512-token system prompt in every
request, plus 64-256 own prompt tokens, outputs uniform in [128, 512].

    python -m bench.capacity --shape llama-3.2-1b --kv-gib 4 --out capacity.json
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.shapes import SHAPES, hf_llama, model_config
from bench.workload import run_offline, shared_prefix_workload, workload
from worker.embedded.engine import EmbeddedEngine
from worker.engine_api import EngineConfig, KvCacheConfig, SchedulerConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kv_bytes_per_token(cfg) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # K and V, bf16


def hf_dynamic_batch(reqs, budget_tokens: int) -> int:
    """Largest batch size B such that batching the workload in arrival order B at a time
    never needs more padded cache than the budget."""
    best = 0
    for b in range(1, len(reqs) + 1):
        need = max(len(group) * (max(len(p) for p, _ in group) + max(n for _, n in group))
                   for group in (reqs[i : i + b] for i in range(0, len(reqs), b)))
        if need > budget_tokens:
            break
        best = b
    return best


@torch.no_grad()
def check_hf_rule(shape: str) -> dict:
    """Run transformers' generate once and compare the cache it returns to the rule."""
    hf = hf_llama(shape, DEVICE, torch.bfloat16)
    lens, new = [100, 300, 37, 250], 20
    width = max(lens)
    ids = torch.zeros((len(lens), width), dtype=torch.long, device=DEVICE)
    mask = torch.zeros_like(ids)
    for j, n in enumerate(lens):
        ids[j, width - n:] = torch.randint(1, 1000, (n,))
        mask[j, width - n:] = 1
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                      pad_token_id=0, return_dict_in_generate=True)
    cache = out.past_key_values
    measured = sum(t.numel() * t.element_size() for layer in _cache_tensors(cache) for t in layer)
    # The last token's K/V is never written: the cache holds the prompt width + new - 1.
    rule = len(lens) * (width + new - 1) * kv_bytes_per_token(model_config(shape))
    del hf, out, cache
    torch.cuda.empty_cache()
    return {"rows": len(lens), "width": width, "new_tokens": new, "cache_bytes": measured, "rule_bytes": rule}


def _cache_tensors(cache):
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--kv-gib", type=float, default=4.0, help="KV cache budget for both sides, GiB")
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--max-seq-len", type=int, default=8192, help="the deployment's max_seq_len (StaticCache rows)")
    ap.add_argument("--out", default="capacity.json")
    args = ap.parse_args()

    cfg = model_config(args.shape)
    per_token = kv_bytes_per_token(cfg)
    budget_tokens = int(args.kv_gib * 2**30) // per_token
    rule = check_hf_rule(args.shape)
    workloads = {"mixed": workload(args.requests, cfg.vocab_size), "shared-prefix": shared_prefix_workload(args.requests, cfg.vocab_size)}
    rows = []
    for name, reqs in workloads.items():
        hf_dyn = hf_dynamic_batch(reqs, budget_tokens)
        hf_static = budget_tokens // args.max_seq_len
        for policy in ("MAX_UTILIZATION", "GUARANTEED_NO_EVICT"):
            engine = EmbeddedEngine(EngineConfig(
                device=DEVICE, dtype="bfloat16", max_seq_len=args.max_seq_len, max_batch_size=1024, cuda_graphs=False,
                kv_cache=KvCacheConfig(tokens_per_block=32, max_tokens=budget_tokens),
                scheduler=SchedulerConfig(capacity_scheduler_policy=policy)), cfg)
            res = run_offline(engine, reqs)
            stats = engine.stats()
            rows.append({"workload": name, "policy": policy, "mean_running": res["mean_running_while_waiting"], "peak_running": res["peak_running"],
                         "preemptions": stats.preemptions, "output_tok_per_s": res["output_tok_per_s"],
                         "hf_dynamic_batch": hf_dyn, "hf_static_batch": hf_static})
            del engine
            torch.cuda.empty_cache()

    print(f"\ncapacity, {args.shape}, KV budget {args.kv_gib} GiB = {budget_tokens} tokens, {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'}")
    print(f"transformers' cache rule checked: generate returned {rule['cache_bytes']} bytes, rule says {rule['rule_bytes']}")
    print(f"{'workload':>14} {'policy':>20} {'ours mean':>9} {'peak':>5} {'preempt':>7} {'HF dynamic':>10} {'HF static@' + str(args.max_seq_len):>15} "
          f"{'vs dynamic':>10} {'vs static':>9}")
    for r in rows:
        dyn, st = r["hf_dynamic_batch"], r["hf_static_batch"]
        print(f"{r['workload']:>14} {r['policy']:>20} {r['mean_running']:>9.1f} {r['peak_running']:>5} {r['preemptions']:>7} {dyn:>10} {st:>15} "
              f"{r['mean_running'] / dyn if dyn else float('inf'):>9.1f}x {r['mean_running'] / st if st else float('inf'):>8.1f}x")
    with open(args.out, "w") as f:
        json.dump({"shape": args.shape, "kv_gib": args.kv_gib, "budget_tokens": budget_tokens, "max_seq_len": args.max_seq_len,
                   "hf_rule_check": rule, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
