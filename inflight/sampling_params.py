"""Sampling parameters, named as TensorRT-LLM's `SamplingParams` and its peers name them."""

from __future__ import annotations

import math

import msgspec

from inflight.errors import invalid

MAX_LOGPROBS = 20


class SamplingParams(msgspec.Struct, frozen=True, omit_defaults=True):
    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # matched on text, in the gateway
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int = 0  # number of top alternatives to return per token; 0 means none

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise RequestError(INVALID_ARGUMENT) naming the first bad field."""

        def finite(name: str, value: float) -> None:
            if not math.isfinite(value):
                raise invalid(name, f"must be a finite number, got {value}")

        if self.max_tokens < 1:
            raise invalid("max_tokens", f"must be at least 1, got {self.max_tokens}")
        finite("temperature", self.temperature)
        if self.temperature < 0:
            raise invalid("temperature", f"must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise invalid("top_k", f"must be >= 0 (0 disables it), got {self.top_k}")
        finite("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise invalid("top_p", f"must be in (0, 1], got {self.top_p}")
        finite("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise invalid("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise invalid("seed", f"must be in [0, 2^63), got {self.seed}")
        if self.min_tokens < 0:
            raise invalid("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.min_tokens > self.max_tokens:
            raise invalid("min_tokens", f"must not exceed max_tokens ({self.max_tokens}), got {self.min_tokens}")
        finite("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise invalid("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        finite("presence_penalty", self.presence_penalty)
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise invalid("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        finite("frequency_penalty", self.frequency_penalty)
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise invalid("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise invalid("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        for s in self.stop:
            if not s:
                raise invalid("stop", "stop strings must not be empty")
        if vocab_size is not None:
            for t in self.stop_token_ids:
                if not 0 <= t < vocab_size:
                    raise invalid("stop_token_ids", f"token id {t} is outside the vocabulary [0, {vocab_size})")
