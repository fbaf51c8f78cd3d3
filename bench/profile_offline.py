"""Host-side profile (cProfile) of the offline workload through the engine on a GPU:
where the Python time of the steps goes. Prints the top functions and step counts.

    python bench/profile_offline.py --shape llama-3.2-1b --requests 192
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.offline_throughput import workload  # noqa: E402
from bench.shapes import SHAPES, model_config  # noqa: E402
from inflight.sampling_params import SamplingParams  # noqa: E402
from worker.embedded.engine import EmbeddedEngine  # noqa: E402
from worker.engine_api import EngineConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--requests", type=int, default=192)
    args = ap.parse_args()
    cfg = model_config(args.shape)
    reqs = workload(args.requests, cfg.vocab_size)
    engine = EmbeddedEngine(EngineConfig(device="cuda", dtype="bfloat16", max_seq_len=2048), cfg)
    for i, (p, n) in enumerate(reqs[:8]):
        engine.submit(f"w{i}", p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    while engine.has_work():
        engine.step()
    for i, (p, n) in enumerate(reqs):
        engine.submit(str(i), p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    kinds = collections.Counter()
    times = collections.defaultdict(float)
    orig_run = engine.runner.run

    def run(chunks, eos):
        kind = "decode-only" if all(c.num_tokens == 1 for c in chunks) else "mixed"
        t = time.perf_counter()
        out = orig_run(chunks, eos)
        times[kind] += time.perf_counter() - t
        kinds[kind] += 1
        return out

    engine.runner.run = run
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    while engine.has_work():
        engine.step()
    prof.disable()
    torch.cuda.synchronize()
    print(f"\n{args.requests} requests in {time.perf_counter() - t:.1f}s; steps: " +
          ", ".join(f"{k} {kinds[k]} ({1000 * times[k] / kinds[k]:.1f} ms each)" for k in kinds))
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
