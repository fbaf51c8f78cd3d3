"""Batched sampling on the device: penalties, min_tokens, temperature, top-k/top-p/min-p,
per-request seeds, and top-n logprobs. One host sync per step, for the chosen tokens."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from inflight.schema import TokenLogprob
from worker.embedded.sequence import Sequence


@dataclasses.dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # per row, where the request asked for them


def _pad(rows: list[list[int]], device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r)
    return out.to(device)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Repetition over prompt and output; presence and frequency over the output (as vLLM)."""
    device = logits.device
    rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
    sub = logits[rows]
    out_ids = _pad([seqs[i].output_token_ids for i in rows], device)
    counts = torch.zeros_like(sub)
    counts.scatter_add_(1, out_ids.clamp(min=0), (out_ids >= 0).to(sub.dtype))
    seen = counts > 0
    prompt_ids = _pad([seqs[i].prompt_token_ids for i in rows], device)
    seen.scatter_(1, prompt_ids.clamp(min=0), prompt_ids >= 0)
    rep = torch.tensor([seqs[i].params.repetition_penalty for i in rows], device=device)[:, None]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    freq = torch.tensor([seqs[i].params.frequency_penalty for i in rows], device=device)[:, None]
    pres = torch.tensor([seqs[i].params.presence_penalty for i in rows], device=device)[:, None]
    sub = sub - freq * counts - pres * (counts > 0).to(sub.dtype)
    logits[rows] = sub


class DeviceSample:
    """A step's sampled tokens (and asked-for logprobs) on their way to the host: the
    copies go into pinned memory behind the step's kernels, so the host can prepare and
    launch the next step before `result()` waits for them."""

    def __init__(self, tokens: torch.Tensor, logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                 top_n: list[int]):
        self.tokens = tokens  # stays on the device: the next step may read its rows
        self.top_n = top_n
        tensors = [tokens] + (list(logprobs) if logprobs is not None else [])
        self.event = None
        self.waited, self.done_at = False, 0.0
        if tokens.device.type == "cuda":
            self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(self.host, tensors):
                h.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensors

    def result(self) -> SampleResult:
        if self.event is not None:
            # Whether the host had to wait for the step, and when it ended if so: the next
            # step, queued behind it, started then (EmbeddedEngine.launch_wait).
            self.waited = not self.event.query()
            self.event.synchronize()
            self.done_at = time.monotonic()
        token_list = self.host[0].tolist()
        lp_out: list = [None] * len(token_list)
        if len(self.host) > 1:
            chosen, top_v, top_i = (t.tolist() for t in self.host[1:])
            for i, n in enumerate(self.top_n):
                if n:
                    lp_out[i] = TokenLogprob(token_list[i], chosen[i], list(zip(top_i[i][:n], top_v[i][:n])))
        return SampleResult(token_list, lp_out)


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...]) -> SampleResult:
    return sample_async(logits, seqs, eos_token_ids).result()


def sample_async(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...],
                 argmax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> DeviceSample:
    """Queue the sampling kernels; nothing waits for the device. Penalties read every
    output token, so the engine runs steps with penalties without overlap. `argmax`, when
    given, takes the rows' argmax of the logits as they are (greedy rows only)."""
    bans = []  # no stopping before min_tokens
    for i, s in enumerate(seqs):
        p = s.params
        if s.num_generated < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
            if banned:
                bans.append((i, banned))
    top_n = [s.params.logprobs for s in seqs]
    if argmax is not None and not bans and not any(top_n) and all(s.params.greedy and not s.params.has_penalties for s in seqs):
        return DeviceSample(argmax(logits), None, top_n)
    logits = logits.float()
    device = logits.device
    if any(s.params.has_penalties for s in seqs):
        apply_penalties(logits, seqs)
    for i, banned in bans:
        logits[i, banned] = float("-inf")

    want_logprobs = any(s.params.logprobs for s in seqs)
    logprobs_all = torch.log_softmax(logits, dim=-1) if want_logprobs else None

    tokens = logits.argmax(dim=-1)
    if not all(s.params.greedy for s in seqs):
        temps = torch.tensor([1.0 if s.params.greedy else s.params.temperature for s in seqs], device=device)
        x = logits / temps[:, None]
        if any(s.params.top_k or s.params.top_p < 1.0 or s.params.min_p > 0.0 for s in seqs):
            x = _truncate(x, seqs)
        probs = torch.softmax(x, dim=-1)
        # Exponential race (argmax p/q, q ~ Exp(1)) draws from probs. A seeded row draws
        # from its own generator, seeded by the seed and the token's position, so a seed
        # gives the same tokens whatever else is in the batch, and a request continued on
        # another worker (with its tokens so far) draws what it would have drawn here.
        q = torch.empty_like(probs).exponential_()
        for i, s in enumerate(seqs):
            if s.params.seed is not None and not s.params.greedy:
                if s.generator is None:
                    s.generator = torch.Generator(device=device)
                s.generator.manual_seed(token_seed(s.params.seed, s.num_generated))
                q[i].exponential_(generator=s.generator)
        sampled = (probs / q).argmax(dim=-1)
        greedy = torch.tensor([s.params.greedy for s in seqs], device=device)
        tokens = torch.where(greedy, tokens, sampled)

    lp = None
    if logprobs_all is not None:
        top_v, top_i = logprobs_all.topk(max(top_n), dim=-1)
        chosen = logprobs_all.gather(1, tokens[:, None])[:, 0]
        lp = (chosen, top_v, top_i)
    return DeviceSample(tokens, lp, top_n)


_MASK64 = 2**64 - 1


def token_seed(seed: int, position: int) -> int:
    """The seed of a request's draw for its `position`-th output token (splitmix64 of the
    two): nearby seeds and positions give unrelated streams."""
    x = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1  # manual_seed takes 63 bits


def _truncate(x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Mask tokens outside each row's top-k, top-p nucleus and min-p floor."""
    device, V = x.device, x.shape[1]
    top_k = torch.tensor([min(s.params.top_k, V) or V for s in seqs], device=device)
    top_p = torch.tensor([s.params.top_p for s in seqs], device=device)
    min_p = torch.tensor([s.params.min_p for s in seqs], device=device)
    sorted_x, order = x.sort(dim=-1, descending=True)
    ranks = torch.arange(V, device=device)[None, :]
    probs = torch.softmax(sorted_x, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly ahead of each token
    drop = (ranks >= top_k[:, None]) | (before >= top_p[:, None]) | (probs < min_p[:, None] * probs[:, :1])
    drop[:, 0] = False  # the most likely token always stays
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.full_like(x, float("-inf")).scatter(1, order, sorted_x)
