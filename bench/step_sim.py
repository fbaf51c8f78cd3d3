"""Open-loop serving, simulated: the engine's own scheduler against a GPU's step times.

The open-loop workload of `bench/serving_load.py` (Poisson arrivals, prompts of 128-1,024
tokens, outputs of 128-512, ignore_eos) is fed through the real `BatchScheduler` and
`KvBlockPool`, with token budgets and chunk limits from the real step-time functions
(`model_runner.tokens_within`, `chunk_within`, `StepTimeModel`). What is simulated is the
device: a step takes a * graph_ms(tokens) + b * decode context + e * prompt pairs (+ host
time), from step times measured on a GPU (a `bench.serving_load` JSON's `step_times`) and
a fit of what serving steps took there. A step's sampled tokens arrive when it ends.

It compares scheduling policies on the same arrivals in seconds, without a GPU. It is a
model: rank policies with it, then measure the chosen one with `bench.serving_load`.

    python -m bench.step_sim --step-times docs/gpu-results/issue15/run13/load_8b_learn_on.json \
        --rate 24 --seconds 120 --targets 15 14 --out .bench/step_sim.json

--learn lets the step model refit to the simulated steps as the engine's does, and
--margins off on runs each target with and without step_time_margin.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from bench.load import percentile
from bench.serving_load import poisson_arrivals
from bench.workload import LENGTHS
from inflight.sampling_params import SamplingParams
from worker.embedded.block_pool import KvBlockPool
from worker.embedded.model_runner import chunk_within, no_slower_than_larger, tokens_within
from worker.embedded.scheduler import BatchScheduler
from worker.embedded.sequence import Sequence
from worker.embedded.step_time import StepTimeModel, prompt_pairs


class Device:
    """Step times: the graph of the next size up, the fitted terms, host time, noise."""

    def __init__(self, sizes, ms, context_ms, coef, host_ms: float, noise: float, seed: int):
        self.sizes, self.ms = no_slower_than_larger(sizes, ms)
        self.context_ms, self.coef, self.host_ms, self.noise = context_ms, coef, host_ms, noise
        self.rng = random.Random(seed)

    def graph_ms(self, tokens: int) -> float:
        for size, t in zip(self.sizes, self.ms):
            if size >= tokens:
                return t
        return self.ms[-1] * tokens / self.sizes[-1]  # eager beyond the largest graph

    def features(self, chunks) -> tuple[float, int, int]:
        """What the engine's step model sees of a step: its graph's start-up time, its
        decodes' context tokens, its prompt chunks' (query, key) pairs."""
        tokens = sum(ch.num_tokens for ch in chunks)
        context = sum(ch.seq.num_computed + 1 for ch in chunks if ch.num_tokens == 1)
        pairs = sum(prompt_pairs(ch.seq.num_computed, ch.num_tokens) for ch in chunks if ch.num_tokens > 1)
        return self.graph_ms(tokens), context, pairs

    def device_ms(self, features: tuple[float, int, int]) -> float:
        """The step's device time: the fitted law, times noise."""
        graph, context, pairs = features
        a, b, e = self.coef
        return (a * graph + b * context + e * pairs) * self.rng.lognormvariate(0.0, self.noise)


def simulate(device: Device, model: StepTimeModel, *, rate: float, seconds: float, target_ms: float,
             max_num_tokens: int, max_batch: int, num_blocks: int, seed: int, lengths=LENGTHS,
             learn: bool = False, margin: bool = False) -> dict:
    """One open-loop point: every request's TTFT, the pooled gaps between tokens, steps.
    learn: the model observes every step's device time, as the engine's does
    (step_time_learning); margin: steps are sized to the target less the model's margin
    (step_time_margin, which needs learn)."""
    n = max(20, round(rate * seconds))
    arrivals = poisson_arrivals(n, rate, seed=seed)
    rng = random.Random(1000 + seed)
    pmin, pmax, omin, omax = lengths
    reqs = [(rng.randint(pmin, pmax), rng.randint(omin, omax)) for _ in range(n)]
    pool = KvBlockPool(num_blocks, 16, False)
    sizes, ms = device.sizes, device.ms
    arrived: dict[str, float] = {}

    model.margined = margin

    def budget(decodes: int, context: int) -> int:
        return tokens_within(sizes, ms, model.graph_budget(model.sized_to(target_ms), context))

    def limit(context, tokens, pairs, start, want):
        return chunk_within(sizes, ms, model, model.sized_to(target_ms), context, tokens, pairs, start, want)

    sched = BatchScheduler(pool, max_batch_size=max_batch, max_num_tokens=max_num_tokens, max_seq_len=4096,
                           enable_chunked_prefill=True, policy="GUARANTEED_NO_EVICT",
                           token_budget=budget if target_ms else None, chunk_limit=limit if target_ms else None)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    gaps: list[float] = []
    # Overlap scheduling, as the engine does on a GPU: while step k runs, the host takes in
    # what has arrived and schedules step k+1 (k's sampled tokens pending), then k's tokens
    # arrive when it ends and k+1 starts.
    nxt, steps, long_steps = 0, 0, 0
    running: tuple[float, list] | None = None  # the step on the device: its end, its chunks
    now = 0.0
    while nxt < n or sched.has_work() or running is not None:
        while nxt < n and arrivals[nxt] <= now:
            rid = str(nxt)
            seq = Sequence(rid, [1] * reqs[nxt][0], SamplingParams(max_tokens=reqs[nxt][1], ignore_eos=True))
            arrived[rid] = arrivals[nxt]
            sched.add(seq)
            nxt += 1
        chunks = sched.schedule() if sched.has_work() else []
        start = running[0] if running is not None else now
        launched = None
        if chunks:
            features = device.features(chunks)
            device_ms = device.device_ms(features)
            if learn:
                model.observe(*features, device_ms)
            dt = (device_ms + device.host_ms) / 1000
            steps += 1
            long_steps += dt * 1000 > target_ms
            for ch in chunks:
                ch.seq.num_computed += ch.num_tokens
                if ch.sample:
                    ch.seq.num_pending += 1
            launched = (start + dt, [ch.seq for ch in chunks if ch.sample])
        if running is not None:
            end, sampled = running
            for seq in sampled:
                seq.num_pending -= 1
                seq.output_token_ids.append(1)
                rid = seq.request_id
                if rid not in first:
                    first[rid] = end
                else:
                    gaps.append(end - last[rid])
                last[rid] = end
                if len(seq.output_token_ids) >= seq.params.max_tokens:
                    sched.remove(seq)
            now = end
        elif launched is None:
            now = arrivals[nxt]  # idle until the next arrival
        running = launched
    ttft = sorted(first[r] - arrived[r] for r in first)  # seconds: percentile gives ms
    out = {"requests": n, "steps": steps, "steps_over_target": long_steps,
           "margin_ms": model.margin(target_ms) if margin else 0.0}
    for name, xs in (("ttft", ttft), ("itl", sorted(gaps))):
        for p in (50, 90, 99, 99.9):
            out[f"{name}_p{p}_ms"] = percentile(xs, p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step-times", type=Path, required=True,
                    help="a bench.serving_load JSON whose step_times (graph sizes and times, context cost) set the device")
    ap.add_argument("--fit", type=float, nargs=3, default=(0.966, 0.0489e-3, 1.47e-6), metavar=("A", "B_MS", "E_MS"),
                    help="what serving steps took: a x graph ms + B_MS a context token + E_MS a prompt pair "
                         "(default: run 13's fit on the 8B shape)")
    ap.add_argument("--rate", type=float, default=24.0)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--seeds", type=int, default=3, help="arrival schedules per point")
    ap.add_argument("--targets", type=float, nargs="+", default=[15.0], help="step_time_target_ms values (0: off)")
    ap.add_argument("--learn", action="store_true",
                    help="the step model observes every step's device time and refits, as the engine's does "
                         "(step_time_learning), starting from --fit; default: --fit held fixed")
    ap.add_argument("--margins", nargs="+", choices=["off", "on"], default=["off"],
                    help="step_time_margin values to run each target with (on implies --learn)")
    ap.add_argument("--host-ms", type=float, default=0.3, help="host time a step adds")
    ap.add_argument("--noise", type=float, default=0.03, help="lognormal sigma of each step's time")
    ap.add_argument("--max-num-tokens", type=int, default=2048)
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--num-blocks", type=int, default=40_000)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    st = json.loads(args.step_times.read_text())["step_times"]
    rows = []
    print(f"{'target ms':>9} {'margin':>6} {'TTFT ms p50/90/99':>20} {'ITL ms p50/90/99/99.9':>26} {'steps over target':>17} "
          f"{'margin ms':>9}")
    for target, margin in [(t, m == "on") for t in args.targets for m in args.margins]:
        runs = []
        for seed in range(args.seeds):
            device = Device(st["mixed_sizes"], st["mixed_ms"], st["context_us_per_token"] / 1000, args.fit,
                            args.host_ms, args.noise, seed)
            model = StepTimeModel(st["context_us_per_token"] / 1000, 10.0, 50_000, 1)
            model.coef[:] = args.fit  # the engine's fit after serving a while
            runs.append(simulate(device, model, rate=args.rate, seconds=args.seconds, target_ms=target,
                                 max_num_tokens=args.max_num_tokens, max_batch=args.max_batch,
                                 num_blocks=args.num_blocks, seed=seed, learn=args.learn or margin, margin=margin))
        m = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        rows.append({"target_ms": target, "margin": margin, "runs": runs, "mean": m})
        print(f"{target:9g} {'on' if margin else 'off':>6} {m['ttft_p50_ms']:6.1f}/{m['ttft_p90_ms']:6.1f}/{m['ttft_p99_ms']:6.1f} "
              f"{m['itl_p50_ms']:5.2f}/{m['itl_p90_ms']:5.2f}/{m['itl_p99_ms']:5.2f}/{m['itl_p99.9_ms']:6.2f} "
              f"{m['steps_over_target'] / m['steps'] if target else float('nan'):17.2%} {m['margin_ms']:9.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
