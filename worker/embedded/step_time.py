"""What a step will take on the device, learned while serving.

At start-up the model runner times each CUDA graph on blank inputs (`graph_ms`: the
projections, norms and sampling rows, what grows with the step's tokens) and what a token
of the decodes' context adds (their KV reads). A step is predicted to take

    a * graph_ms + b * decode_context_tokens + e * prompt_pairs

where prompt_pairs counts the (query, key) pairs of the step's prompt chunks, the
attention a chunk that continues a long prompt pays and blank inputs do not. The engine
sizes prompt chunks so that the prediction stays within step_time_target_ms.

The start-up timings are not what serving meets: blocks lie scattered, contexts differ in
length, clocks move, and the start-up context timing ran one shape. So the engine times
every graph step it launches (CUDA events around the replay) and refits a, b and e to
those steps by least squares, recent steps weighing more. The fit is pulled towards a = 1,
b = the start-up cost and e = 0, as if by one step that said so, which keeps it there
until the steps say otherwise (and where they cannot tell the terms apart); bounds keep a
few odd steps from moving the budget far.

A fit is right on average, and a step sized to the target runs over it whenever the step
runs longer than predicted: served, the wait between tokens at p99 then sits past the target
(BENCHMARKS.md, run 25). So a model made `margined` also keeps a margin: the 90th percentile
of how far the steps sized near the target ran past their prediction (recomputed every
MARGIN_EVERY steps, at most MARGIN_MAX of the target), and steps are sized to the target
less that margin (sized_to)."""

from __future__ import annotations

import numpy as np

DECAY = 0.98  # each step's weight shrinks by this every later step (about the last 50 count)
PRIOR_WEIGHT = 1.0  # the pull towards the start-up values weighs as much as one step
A_BOUNDS = (0.7, 3.0)  # the graph term's factor
B_FACTOR_MAX = 8.0  # the context cost at most this many times the start-up one
RECENT = 8192  # steps whose prediction and measurement `residuals` reports on
SIZED_NEAR = 0.9  # steps predicted at this share of the (margined) target or more were sized by it
MARGIN_QUANTILE = 90  # percent: sized steps run past the target about one time in ten
MARGIN_EVERY = 128  # steps between recomputations of the margin
MARGIN_MIN_STEPS = 64  # sized steps among the recent ones before there is a margin
MARGIN_MAX = 0.1  # the margin is at most this share of the target


def prompt_pairs(start: int, n: int) -> int:
    """The (query, key) pairs of a prompt chunk of n tokens from position `start`: each
    new token attends to every earlier token and itself."""
    return n * start + n * (n + 1) // 2


class StepTimeModel:
    def __init__(self, context_ms_per_token: float, typical_graph_ms: float, typical_context: int,
                 typical_pairs: int, margined: bool = False):
        self.prior = np.array([1.0, context_ms_per_token, 0.0])
        scale = np.array([max(typical_graph_ms, 1e-3), max(typical_context, 1), max(typical_pairs, 1)], dtype=float)
        self._ridge = np.diag(PRIOR_WEIGHT * scale ** 2)
        self.coef = self.prior.copy()  # a, b, e
        self.steps = 0
        self._xx = np.zeros((3, 3))  # decayed sums of x x^T and x * measured
        self._xm = np.zeros(3)
        # The last RECENT steps' predicted and measured ms, a ring from _at.
        self._pred, self._meas, self._at = np.zeros(RECENT), np.zeros(RECENT), 0
        self._margin, self._margin_steps = 0.0, 0
        self.margined = margined  # sized_to takes the margin off the target (EngineConfig.step_time_margin)

    def predict(self, graph_ms: float, context: int, pairs: int = 0) -> float:
        a, b, e = self.coef
        return a * graph_ms + b * context + e * pairs

    def sized_to(self, target_ms: float) -> float:
        """What a step is sized to for a target of target_ms: the target, less the margin
        where the model is margined."""
        return target_ms - self.margin(target_ms) if self.margined else target_ms

    def graph_budget(self, target_ms: float, context: int, pairs: int = 0) -> float:
        """The most graph_ms a step may have and be predicted within target_ms."""
        a, b, e = self.coef
        return (target_ms - b * context - e * pairs) / a

    def observe(self, graph_ms: float, context: int, pairs: int, measured_ms: float) -> None:
        """One launched step: its start-up graph time, its decodes' context tokens, its
        prompt chunks' (query, key) pairs, and what it took."""
        x = np.array([graph_ms, context, pairs], dtype=float)
        i = self._at % RECENT
        self._pred[i], self._meas[i] = self.coef @ x, measured_ms  # as predicted before this step refits
        self._at += 1
        self._xx = DECAY * self._xx + np.outer(x, x)
        self._xm = DECAY * self._xm + x * measured_ms
        self.steps += 1
        try:
            a, b, e = np.linalg.solve(self._xx + self._ridge, self._xm + self._ridge @ self.prior)
        except np.linalg.LinAlgError:
            return
        b_max = B_FACTOR_MAX * self.prior[1] if self.prior[1] > 0 else np.inf
        self.coef = np.array([min(max(a, A_BOUNDS[0]), A_BOUNDS[1]), min(max(b, 0.0), b_max), max(e, 0.0)])

    def recent(self) -> tuple[np.ndarray, np.ndarray]:
        """The last RECENT steps' predicted and measured ms (in no particular order)."""
        n = min(self._at, RECENT)
        return self._pred[:n], self._meas[:n]

    def _sized(self, target_ms: float) -> np.ndarray:
        """Which recent steps were sized by target_ms (predicted within SIZED_NEAR of it
        less the margin)."""
        return self.recent()[0] >= SIZED_NEAR * (target_ms - self._margin)

    def margin(self, target_ms: float) -> float:
        """What to take off target_ms when sizing a step: the MARGIN_QUANTILE percentile of
        how far the recent steps sized by it ran past their prediction (0 until
        MARGIN_MIN_STEPS of them, at most MARGIN_MAX of the target)."""
        if self.steps - self._margin_steps >= MARGIN_EVERY:
            self._margin_steps = self.steps
            sized = self._sized(target_ms)
            if sized.sum() >= MARGIN_MIN_STEPS:
                pred, meas = self.recent()
                over = float(np.percentile(meas[sized] - pred[sized], MARGIN_QUANTILE))
                self._margin = min(max(over, 0.0), MARGIN_MAX * target_ms)
        return self._margin

    def residuals(self, target_ms: float = 0.0) -> dict:
        """How the last RECENT steps' measured time departed from their prediction (measured
        minus predicted, ms: p50 / p90 / p99 / max), over all of them and over those sized by
        a target of `target_ms` (predicted within SIZED_NEAR of it), with the share of those
        that ran over the target, and the margin steps are sized by: where a wait between
        tokens longer than the target comes from."""
        def stats(d: np.ndarray) -> dict:
            if not len(d):
                return {"steps": 0}
            q50, q90, q99 = np.percentile(d, [50, 90, 99]).tolist()
            return {"steps": len(d), "p50": q50, "p90": q90, "p99": q99, "max": float(d.max())}

        pred, meas = self.recent()
        out = {"all": stats(meas - pred)}
        if target_ms > 0:
            sized = self._sized(target_ms)
            out["sized"] = stats(meas[sized] - pred[sized])
            out["sized"]["over_target"] = float((meas[sized] > target_ms).mean()) if sized.any() else 0.0
            out["margin_ms"] = self._margin
        return out
