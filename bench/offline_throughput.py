"""Offline throughput: a seeded synthetic workload through the embedded engine, against
Hugging Face transformers `generate` on the same random weights in the same run.

Workload: N requests, prompt lengths uniform in [128, 1024], output lengths uniform in
[128, 512], ignore_eos (so both sides produce exactly the asked-for tokens). Ours takes all
requests at once (in-flight batching). Transformers runs static batches of --hf-batch
requests (left-padded; each batch runs to its longest output) over the first
--hf-requests requests; only the tokens each request asked for count as useful.

    python -m bench.offline_throughput --shape llama-3.2-1b --out offline_throughput.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.shapes import SHAPES, hf_llama, model_config
from bench.workload import run_offline, workload
from worker.embedded.engine import EmbeddedEngine
from worker.engine_api import EngineConfig, KernelConfig, KvCacheConfig


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


def fixed_lengths(lengths: list[int]) -> tuple[int, int, int, int]:
    """workload()'s ranges for every request IN prompt tokens and OUT output tokens."""
    n_in, n_out = lengths
    return n_in, n_in, n_out, n_out


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
    ap.add_argument("--fused-quant", nargs="+", default=["on"], choices=["on", "off"],
                    help="KernelConfig.fused_quant: the norm and SiLU kernels quantize for the 8-bit projection after them "
                         "(several: one run each)")
    ap.add_argument("--decode-kernel", nargs="+", default=["paged"], choices=["paged", "flat"],
                    help="KernelConfig.decode_kernel: the decodes' attention kernel (several: one run each)")
    ap.add_argument("--quantization", nargs="+", default=["none"],
                    choices=["none", "fp8", "int8-weight-only", "int8-smoothquant"], help="projection weights (several: one run each)")
    ap.add_argument("--kv-cache-dtype", nargs="+", default=["auto"], choices=["auto", "fp8"],
                    help="what the KV cache stores (several: one run each)")
    ap.add_argument("--lengths", type=int, nargs=2, metavar=("IN", "OUT"),
                    help="every request IN prompt tokens and OUT output tokens, as trtllm-bench runs them "
                         "(default: the mixed workload)")
    ap.add_argument("--max-num-tokens", type=int, nargs="+", default=[0],
                    help="the engine's max_num_tokens, tokens a step computes at most (several: one run each; 0: the "
                         "engine's default, 2,048 on a GPU; steps above 2,048 run eagerly, without CUDA graphs)")
    ap.add_argument("--step-time-target-ms", type=float, default=0.0,
                    help="the engine's step_time_target_ms (default 0, off: with every request submitted at once, "
                         "steps take up to max_num_tokens, as trtllm-bench runs TensorRT-LLM)")
    ap.add_argument("--out", default="offline_throughput.json")
    args = ap.parse_args()
    cfg = model_config(args.shape)
    reqs = workload(args.requests, cfg.vocab_size, **({"lengths": fixed_lengths(args.lengths)} if args.lengths else {}))
    max_seq_len = max(2048, sum(args.lengths or ()))
    runs = []
    for mbs, overlap, use_pdl, varlen, quant, kv_dtype, fq, mnt, dk in (
            (m, o, p, v, q, d, f, t, k) for m in args.max_batch_size for o in args.overlap for p in args.pdl for v in args.varlen
            for q in args.quantization for d in args.kv_cache_dtype for f in args.fused_quant for t in args.max_num_tokens
            for k in args.decode_kernel):
        kernels = KernelConfig(pdl=use_pdl == "on", varlen_prefill=varlen == "on", fused_quant=fq == "on", decode_kernel=dk)
        engine = EmbeddedEngine(EngineConfig(device="cuda", dtype="bfloat16", max_seq_len=max_seq_len, max_batch_size=mbs,
                                             max_num_tokens=mnt or None,
                                             overlap_scheduler=overlap, kernels=kernels, quantization=quant,
                                             kv_cache=KvCacheConfig(dtype=kv_dtype),
                                             step_time_target_ms=args.step_time_target_ms), cfg)
        run_offline(engine, reqs[:16])  # warm-up: kernels compiled, allocator settled
        ours = run_offline(engine, reqs)
        ours["max_batch_size"] = mbs
        ours["overlap"] = overlap
        ours["pdl"] = use_pdl
        ours["varlen"] = varlen
        ours["quantization"] = quant
        ours["kv_cache_dtype"] = kv_dtype
        ours["fused_quant"] = fq
        ours["decode_kernel"] = dk
        ours["max_num_tokens"] = engine.max_num_tokens
        ours["kv_tokens"] = engine.pool.num_blocks * engine.pool.tokens_per_block
        ours["preemptions"] = engine.stats().preemptions
        runs.append(ours)
        del engine
        torch.cuda.empty_cache()
    hf_res = None
    if args.hf_requests:
        hf = hf_llama(args.shape, dtype=torch.bfloat16)
        hf_res = run_hf(hf, reqs[: args.hf_requests], args.hf_batch)
    print(f"\noffline throughput, {args.shape}, bf16, {torch.cuda.get_device_name()}, "
          f"{'%d in / %d out' % tuple(args.lengths) if args.lengths else 'mixed lengths'}")
    print(f"{'engine':>124} {'requests':>8} {'out tokens':>10} {'seconds':>8} {'out tok/s':>10} {'vs HF':>6} {'preempted':>9}")
    for ours in runs:
        ratio = ours["output_tok_per_s"] / hf_res["output_tok_per_s"] if hf_res else 0.0
        label = (f"inflight {ours['quantization']}, max batch {ours['max_batch_size']}, overlap {ours['overlap']}, "
                 f"pdl {ours['pdl']}, varlen {ours['varlen']}, fused quant {ours['fused_quant']}, "
                 f"KV {ours['kv_tokens']} tok {ours['kv_cache_dtype']}, step {ours['max_num_tokens']} tok"
                 + (f", {ours['decode_kernel']} decode" if len(args.decode_kernel) > 1 else ""))
        print(f"{label:>124} {ours['requests']:>8} {ours['output_tokens']:>10} "
              f"{ours['seconds']:>8.1f} {ours['output_tok_per_s']:>10.0f} {ratio:>5.1f}x {ours['preemptions']:>9}")
    if hf_res:
        print(f"{'transformers, batch ' + str(hf_res['batch']):>124} {hf_res['requests']:>8} {hf_res['output_tokens']:>10} "
              f"{hf_res['seconds']:>8.1f} {hf_res['output_tok_per_s']:>10.0f}")
    with open(args.out, "w") as f:
        json.dump({"shape": args.shape, "lengths": args.lengths, "device": torch.cuda.get_device_name(), "ours": runs, "transformers": hf_res}, f, indent=2)


if __name__ == "__main__":
    main()
