"""The benchmarks' requests: seeded lists of (prompt token ids, output tokens), all run
with ignore_eos so every side produces exactly the tokens asked for, and the offline run
of such a list through an engine."""

from __future__ import annotations

import random
import time

from inflight.sampling_params import SamplingParams

LENGTHS = (128, 1024, 128, 512)  # prompt tokens min, max; output tokens min, max


def workload(n: int, vocab: int, seed: int = 0, lengths: tuple[int, int, int, int] = LENGTHS) -> list[tuple[list[int], int]]:
    """The offline workload: prompt and output lengths uniform in their ranges."""
    rng = random.Random(seed)
    pmin, pmax, omin, omax = lengths
    return [([rng.randrange(vocab) for _ in range(rng.randint(pmin, pmax))], rng.randint(omin, omax)) for _ in range(n)]


def shared_prefix_workload(n: int, vocab: int, seed: int = 1) -> list[tuple[list[int], int]]:
    """One 512-token system prompt in every request, plus 64-256 tokens of its own;
    outputs uniform in [128, 512]."""
    rng = random.Random(seed)
    system = [rng.randrange(vocab) for _ in range(512)]
    return [(system + [rng.randrange(vocab) for _ in range(rng.randint(64, 256))], rng.randint(128, 512)) for _ in range(n)]


def run_offline(engine, reqs) -> dict:
    """Every request submitted at once (in-flight batching), stepped until done: output
    tokens per second, and the running sequences per step (mean, peak, and the mean over
    the steps while requests waited for room, when the cache is the limit)."""
    import torch

    t = time.perf_counter()
    for i, (prompt, out_len) in enumerate(reqs):
        engine.submit(str(i), prompt, SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True))
    produced, steps, running_sum, running_peak, full_steps, full_sum = 0, 0, 0, 0, 0, 0
    while engine.has_work():
        produced += sum(len(o.new_token_ids) for o in engine.step())
        stats = engine.stats()
        running = stats.running
        steps, running_sum, running_peak = steps + 1, running_sum + running, max(running_peak, running)
        if stats.queued:  # requests wait for room: the cache is the limit
            full_steps, full_sum = full_steps + 1, full_sum + running
    torch.cuda.synchronize()
    secs = time.perf_counter() - t
    return {"requests": len(reqs), "output_tokens": produced, "seconds": secs, "output_tok_per_s": produced / secs,
            "steps": steps, "mean_running": running_sum / max(steps, 1), "peak_running": running_peak,
            "mean_running_while_waiting": full_sum / max(full_steps, 1)}
