"""bench.step_sim: the engine's scheduler against a GPU's measured step times."""

import json
from pathlib import Path

from bench.step_sim import Device, simulate
from worker.embedded.step_time import StepTimeModel

RUN13 = Path(__file__).parent.parent / "docs/gpu-results/issue15/run13/load_8b_learn_on.json"
FIT = (0.966, 0.0489e-3, 1.47e-6)  # run 13's fit on the 8B shape


def run(target_ms: float, rate: float = 24.0, noise: float = 0.0) -> dict:
    st = json.loads(RUN13.read_text())["step_times"]
    device = Device(st["mixed_sizes"], st["mixed_ms"], st["context_us_per_token"] / 1000, FIT, 0.3, noise, seed=0)
    model = StepTimeModel(st["context_us_per_token"] / 1000, 10.0, 50_000, 1)
    model.coef[:] = FIT
    return simulate(device, model, rate=rate, seconds=6, target_ms=target_ms, max_num_tokens=2048, max_batch=256,
                    num_blocks=40_000, seed=0)


def test_steps_sized_by_time_bound_the_gaps_and_cost_first_tokens():
    off, on = run(0), run(15)
    # Without noise, a step sized to the target ends within it (+ host time), but for the
    # steps whose first prompt chunk alone passes it (MIN_PREFILL_TOKENS).
    assert on["itl_p90_ms"] <= 15.3 < off["itl_p99_ms"]
    assert on["steps_over_target"] / on["steps"] < 0.05
    assert on["ttft_p50_ms"] > off["ttft_p50_ms"]  # prompts wait for room in the steps
    assert on["requests"] == off["requests"] == 144


def test_a_light_load_meets_both_targets():
    light = run(15, rate=4)
    assert light["ttft_p99_ms"] < 150 and light["itl_p99_ms"] <= 15.3


def test_with_learning_and_the_margin_fewer_sized_steps_run_past_the_target():
    """Steps whose device time varies (5% lognormal): the step model learning from them and
    sizing to the target less its margin (step_time_margin) leaves fewer steps over a 14 ms
    target than sizing to the target itself."""
    st = json.loads(RUN13.read_text())["step_times"]

    def sim(margin: bool) -> dict:
        device = Device(st["mixed_sizes"], st["mixed_ms"], st["context_us_per_token"] / 1000, FIT, 0.3, 0.05, seed=0)
        model = StepTimeModel(st["context_us_per_token"] / 1000, 10.0, 50_000, 1)
        model.coef[:] = FIT
        return simulate(device, model, rate=24.0, seconds=10, target_ms=14.0, max_num_tokens=2048, max_batch=256,
                        num_blocks=40_000, seed=0, learn=True, margin=margin)

    off, on = sim(False), sim(True)
    assert off["margin_ms"] == 0.0 < on["margin_ms"] <= 1.4
    assert on["steps_over_target"] / on["steps"] < 0.75 * off["steps_over_target"] / off["steps"], (on, off)
