"""GPU-side profile (torch.profiler) of one mixed prefill+decode step and of one
decode-only step of the offline workload: the kernels that take the time.

    python bench/profile_step.py --shape llama-3.2-1b
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.offline_throughput import workload  # noqa: E402
from bench.shapes import SHAPES, model_config  # noqa: E402
from inflight.sampling_params import SamplingParams  # noqa: E402
from worker.embedded.engine import EmbeddedEngine  # noqa: E402
from worker.engine_api import EngineConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    args = ap.parse_args()
    cfg = model_config(args.shape)
    engine = EmbeddedEngine(EngineConfig(device="cuda", dtype="bfloat16", max_seq_len=2048), cfg)
    reqs = workload(48, cfg.vocab_size)
    for i, (p, n) in enumerate(reqs[:4]):  # warm-up
        engine.submit(f"w{i}", p, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    while engine.has_work():
        engine.step()
    for i, (p, n) in enumerate(reqs):
        engine.submit(str(i), p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    for label in ("mixed step", "decode-only step"):
        if label == "decode-only step":
            while engine.scheduler.waiting or any(s.num_uncomputed > 1 for s in engine.scheduler.running):
                engine.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.step()
            torch.cuda.synchronize()
        print(f"\n== {label}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
