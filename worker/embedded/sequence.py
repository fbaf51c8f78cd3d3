"""One request inside the embedded engine: its tokens, its KV blocks, its progress."""

from __future__ import annotations

import enum

import torch

from inflight.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = 1
    RUNNING = 2
    FINISHED = 3


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.resumed = 0  # output tokens it arrived with (made by a worker that died)
        self.params = params
        self.status = SeqStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks published so far
        self.num_computed = 0  # tokens whose K/V are in the cache
        # Overlap scheduling: tokens sampled by steps still running on the device. They
        # count in the sequence's length; their values reach the host a step later.
        self.num_pending = 0
        self.pending_row = -1  # row of the newest pending token in the runner's token buffer
        self.num_cached_prompt = 0  # prompt tokens that came from the prefix cache
        self.counted_prompt = False  # prefix-cache stats counted once, not per preemption
        self.scheduled_at: float | None = None  # unix time of the first step that ran it
        self.generator: torch.Generator | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, i: int) -> int:
        """Token i, which must be known on the host (not pending)."""
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_known(self) -> int:
        """Tokens whose values the host has."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.output_token_ids) + self.num_pending

    def done_by_length(self, max_seq_len: int) -> bool:
        """Its pending tokens already take it to max_tokens or max_seq_len."""
        return self.num_pending > 0 and (self.num_generated >= self.params.max_tokens or len(self) >= max_seq_len)

    @property
    def num_uncomputed(self) -> int:
        return len(self) - self.num_computed

    def final_length(self, max_seq_len: int) -> int:
        """The most tokens this sequence can ever hold."""
        return min(len(self.prompt_token_ids) + self.params.max_tokens, max_seq_len)

    def reset_for_recompute(self) -> None:
        """After preemption: drop KV state, keep every token produced so far."""
        self.status = SeqStatus.WAITING
        self.block_table = []
        self.block_hashes = []
        self.num_computed = 0
