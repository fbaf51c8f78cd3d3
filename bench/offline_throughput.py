"""Offline throughput: a seeded synthetic workload through the embedded engine, against
Hugging Face transformers `generate` on the same random weights in the same run.

Workload: N requests, prompt lengths uniform in [128, 1024], output lengths uniform in
[128, 512], ignore_eos (so both sides produce exactly the asked-for tokens). Ours takes all
requests at once (in-flight batching). Transformers runs static batches of --hf-batch
requests (left-padded; each batch runs to its longest output) over the first
--hf-requests requests; only the tokens each request asked for count as useful.

    python bench/offline_throughput.py --shape llama-3.2-1b --out offline_throughput.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.shapes import SHAPES, model_config  # noqa: E402
from inflight.sampling_params import SamplingParams  # noqa: E402
from worker.embedded.engine import EmbeddedEngine  # noqa: E402
from worker.embedded import model_runner  # noqa: E402
from worker.embedded.kernels import pdl  # noqa: E402
from worker.engine_api import EngineConfig  # noqa: E402


def workload(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(128, 1024))], rng.randint(128, 512)) for _ in range(n)]


def run_ours(engine: EmbeddedEngine, reqs) -> dict:
    t = time.perf_counter()
    for i, (prompt, out_len) in enumerate(reqs):
        engine.submit(str(i), prompt, SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True))
    produced, steps, running_sum, running_peak, full_steps, full_sum = 0, 0, 0, 0, 0, 0
    while engine.has_work():
        produced += sum(len(o.new_token_ids) for o in engine.step())
        running = len(engine.scheduler.running)
        steps, running_sum, running_peak = steps + 1, running_sum + running, max(running_peak, running)
        if engine.scheduler.waiting:  # requests wait for room: the cache is the limit
            full_steps, full_sum = full_steps + 1, full_sum + running
    torch.cuda.synchronize()
    secs = time.perf_counter() - t
    return {"requests": len(reqs), "output_tokens": produced, "seconds": secs, "output_tok_per_s": produced / secs,
            "steps": steps, "mean_running": running_sum / max(steps, 1), "peak_running": running_peak,
            "mean_running_while_waiting": full_sum / max(full_steps, 1)}


@torch.no_grad()
def run_hf(hf, reqs, batch: int) -> dict:
    useful, t = 0, time.perf_counter()
    for i in range(0, len(reqs), batch):
        group = reqs[i : i + batch]
        width = max(len(p) for p, _ in group)
        ids = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (p, _) in enumerate(group):  # left padding
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        new = max(n for _, n in group)
        hf.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        useful += sum(n for _, n in group)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t
    return {"requests": len(reqs), "batch": batch, "output_tokens": useful, "seconds": secs, "output_tok_per_s": useful / secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--hf-requests", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=128)
    ap.add_argument("--max-batch-size", type=int, nargs="+", default=[256], help="our engine's max_batch_size (several: one run each)")
    ap.add_argument("--overlap", nargs="+", default=["on", "off"], choices=["on", "off"], help="overlap scheduling (several: one run each)")
    ap.add_argument("--pdl", nargs="+", default=["on"], choices=["on", "off"],
                    help="programmatic dependent launch for small-batch kernels (several: one run each)")
    ap.add_argument("--varlen", nargs="+", default=["on"], choices=["on", "off"],
                    help="prefill attention as one varlen flash-attention call, or SDPA per sequence (several: one run each)")
    ap.add_argument("--out", default="offline_throughput.json")
    args = ap.parse_args()
    cfg = model_config(args.shape)
    reqs = workload(args.requests, cfg.vocab_size)
    runs = []
    for mbs, overlap, use_pdl, varlen in ((m, o, p, v) for m in args.max_batch_size for o in args.overlap
                                          for p in args.pdl for v in args.varlen):
        pdl.ENABLED = use_pdl == "on"
        model_runner.VARLEN = varlen == "on"
        engine = EmbeddedEngine(EngineConfig(device="cuda", dtype="bfloat16", max_seq_len=2048, max_batch_size=mbs,
                                             overlap_scheduler=overlap), cfg)
        run_ours(engine, reqs[:16])  # warm-up: kernels compiled, allocator settled
        ours = run_ours(engine, reqs)
        ours["max_batch_size"] = mbs
        ours["overlap"] = overlap
        ours["pdl"] = use_pdl
        ours["varlen"] = varlen
        ours["preemptions"] = engine.stats().preemptions
        runs.append(ours)
        del engine
        torch.cuda.empty_cache()
    hf_res = None
    if args.hf_requests:
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device("cuda"):
            hf = LlamaForCausalLM(LlamaConfig(**SHAPES[args.shape])).to(torch.bfloat16).eval()
        hf_res = run_hf(hf, reqs[: args.hf_requests], args.hf_batch)
    print(f"\noffline throughput, {args.shape}, bf16, {torch.cuda.get_device_name()}")
    print(f"{'engine':>60} {'requests':>8} {'out tokens':>10} {'seconds':>8} {'out tok/s':>10} {'vs HF':>6} {'preempted':>9}")
    for ours in runs:
        ratio = ours["output_tok_per_s"] / hf_res["output_tok_per_s"] if hf_res else 0.0
        label = f"inflight, max batch {ours['max_batch_size']}, overlap {ours['overlap']}, pdl {ours['pdl']}, varlen {ours['varlen']}"
        print(f"{label:>60} {ours['requests']:>8} {ours['output_tokens']:>10} "
              f"{ours['seconds']:>8.1f} {ours['output_tok_per_s']:>10.0f} {ratio:>5.1f}x {ours['preemptions']:>9}")
    if hf_res:
        print(f"{'transformers, batch ' + str(hf_res['batch']):>60} {hf_res['requests']:>8} {hf_res['output_tokens']:>10} "
              f"{hf_res['seconds']:>8.1f} {hf_res['output_tok_per_s']:>10.0f}")
    with open(args.out, "w") as f:
        json.dump({"shape": args.shape, "ours": runs, "transformers": hf_res}, f, indent=2)


if __name__ == "__main__":
    main()
