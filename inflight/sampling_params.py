"""Sampling parameters, named as TensorRT-LLM's `SamplingParams` and its peers name them.
Checked by inflight/validation.py."""

from __future__ import annotations

import msgspec

# Temperatures below this sample greedily: dividing logits by one (in float32 on the device)
# overflows to inf, and the softmax then gives NaN. vLLM draws the line at the same place.
GREEDY_BELOW = 1e-5


class SamplingParams(msgspec.Struct, frozen=True, omit_defaults=True):
    max_tokens: int = 256
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) means greedy
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
        return self.temperature < GREEDY_BELOW

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
