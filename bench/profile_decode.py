"""Kernel-level profile (torch.profiler) of steady decode steps at a given batch size,
without CUDA graphs so every kernel shows: where a decode step's device time goes.

    python bench/profile_decode.py --shape llama-3.2-1b --batch 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.shapes import SHAPES, model_config  # noqa: E402
from inflight.sampling_params import SamplingParams  # noqa: E402
from worker.embedded.engine import EmbeddedEngine  # noqa: E402
from worker.engine_api import EngineConfig, KvCacheConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=192)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    cfg = model_config(args.shape)
    engine = EmbeddedEngine(EngineConfig(device="cuda", dtype="bfloat16", max_seq_len=4096, cuda_graphs=False,
                                         kv_cache=KvCacheConfig(max_tokens=args.batch * 1024 + 4096)), cfg)
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=10_000 // 4, temperature=0, ignore_eos=True)
    for i in range(args.batch):
        engine.submit(str(i), torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=gen).tolist(), params)
    for _ in range(8):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
    total = sum(e.self_device_time_total for e in events)
    print(f"\n{args.shape}, batch {args.batch}, context ~{args.prompt_len}: device time per step {total / args.steps:.1f} us")
    print(f"{'us/step':>8} {'calls/step':>10} {'us/call':>8}  kernel")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:25]:
        per_step = e.self_device_time_total / args.steps
        calls = e.count / args.steps
        print(f"{per_step:>8.1f} {calls:>10.1f} {per_step / calls if calls else 0:>8.2f}  {e.key[:110]}")


if __name__ == "__main__":
    main()
