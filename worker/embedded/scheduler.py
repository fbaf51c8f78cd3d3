"""Iteration-level scheduling: which requests run in the next engine step, and how far.

Each step has a token budget: `max_num_tokens`, or, while requests are decoding, what the
engine's `token_budget(decodes, context)` allows (a step's time grows with its tokens, and
every decoding stream waits for the whole step). Running requests go first: decodes (a token
each), then unfinished prefills in the order they were admitted, continuing in chunks; then
waiting requests are admitted first come, first served. Capacity policies as
TensorRT-LLM names them:
- GUARANTEED_NO_EVICT admits a request only if its whole future (prompt + max_tokens)
  fits beside what running requests may still claim, so nobody is ever preempted;
- MAX_UTILIZATION admits whatever fits now and, when blocks run out, preempts the newest
  request: its blocks are freed and it is recomputed later, keeping its tokens.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Callable

from worker.embedded.block_pool import KvBlockPool
from worker.embedded.sequence import Sequence, SeqStatus
from worker.embedded.step_time import prompt_pairs


@dataclasses.dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens to compute this step, starting at seq.num_computed
    sample: bool  # the chunk reaches the sequence's end, so a token is sampled


# While requests decode, prompts still get this many tokens a step, however long the
# decodes alone take: new requests always make progress.
MIN_PREFILL_TOKENS = 128


class BatchScheduler:
    def __init__(
        self,
        pool: KvBlockPool,
        *,
        max_batch_size: int,
        max_num_tokens: int,
        max_seq_len: int,
        enable_chunked_prefill: bool,
        policy: str,
        token_budget: Callable[[int, int], int] | None = None,
        chunk_limit: Callable[[int, int, int, int, int], int] | None = None,
    ):
        """token_budget(decodes, context tokens they read) -> the step's token budget while
        requests decode (at most max_num_tokens); None: max_num_tokens always.
        chunk_limit(context, step tokens so far, step prompt pairs so far, chunk start,
        tokens wanted) -> the most of them a prompt chunk may take while requests decode,
        its attention over the prompt's earlier tokens counted (the (query, key) pairs);
        None: only the token budget. The step's first prompt chunk still gets up to
        MIN_PREFILL_TOKENS."""
        self.pool = pool
        self.token_budget = token_budget
        self.chunk_limit = chunk_limit
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.max_seq_len = max_seq_len
        self.chunked = enable_chunked_prefill
        self.policy = policy
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self.pool.release(seq.block_table)
        seq.block_table = []
        seq.status = SeqStatus.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def blocks_for_lifetime(self, seq: Sequence) -> int:
        return self.pool.blocks_needed(seq.final_length(self.max_seq_len))

    def schedule(self) -> list[ScheduledChunk]:
        decodes, prefills, finishing = [], [], 0
        for seq in self.running:
            if seq.done_by_length(self.max_seq_len):  # its last token is still on the device
                finishing += 1
            elif seq.num_uncomputed == 1:
                decodes.append(seq)
            else:
                prefills.append(seq)
        budget = self.max_num_tokens
        context = sum(seq.num_computed + 1 for seq in decodes)
        if decodes and self.token_budget is not None:
            budget = min(budget, max(self.token_budget(len(decodes), context), len(decodes) + MIN_PREFILL_TOKENS))
        fill = _StepFill(context, self.chunk_limit if decodes else None)
        chunks: dict[Sequence, ScheduledChunk] = {}
        # Decodes first, so that a long prefill never holds a stream's next token back.
        for seq in decodes:
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted by an earlier _grow
                continue
            if not self._grow(seq, seq.num_computed + 1, chunks):
                continue
            chunks[seq] = ScheduledChunk(seq, 1, True)
            budget -= 1
            fill.tokens += 1
        for seq in prefills:
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue
            n = seq.num_uncomputed
            if n > budget:
                if not self.chunked:
                    continue
                n = budget
            n = fill.limit(seq.num_computed, n, self.chunked)
            if not n or not self._grow(seq, seq.num_computed + n, chunks):
                continue
            chunks[seq] = ScheduledChunk(seq, n, seq.num_computed + n == len(seq))
            budget -= n
            fill.add(seq.num_computed, n)
        scheduled = list(chunks.values())
        if len(scheduled) + finishing == len(self.running):
            budget = self._admit(scheduled, budget, fill)
        return scheduled

    def _grow(self, seq: Sequence, num_tokens: int, chunks: dict[Sequence, ScheduledChunk]) -> bool:
        """Give seq blocks for num_tokens, preempting the newest requests if needed (and
        dropping what this step had scheduled for them)."""
        need = self.pool.blocks_needed(num_tokens) - len(seq.block_table)
        while self.pool.num_free < need:
            victim = self.running[-1]
            self._preempt(victim)
            chunks.pop(victim, None)
            if victim is seq:
                return False
        for _ in range(need):
            seq.block_table.append(self.pool.allocate())
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.release(seq.block_table)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _reserved(self) -> int:
        """Blocks that running requests may still claim before they finish."""
        return sum(max(0, self.blocks_for_lifetime(s) - len(s.block_table)) for s in self.running)

    def _admit(self, chunks: list[ScheduledChunk], budget: int, fill: "_StepFill") -> int:
        pool = self.pool
        reserved = self._reserved() if self.policy == "GUARANTEED_NO_EVICT" else 0
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if seq.num_pending:  # preempted with a token still on the device: next step
                break
            tokens = seq.all_token_ids
            # Leave at least one token to compute: its logits give the next token.
            cached = pool.match_prefix(tokens, (len(tokens) - 1) // pool.tokens_per_block)
            num_cached = len(cached) * pool.tokens_per_block
            n = len(tokens) - num_cached
            if n > budget:
                if not self.chunked:
                    break
                n = budget
            n = fill.limit(num_cached, n, self.chunked)
            if not n:
                break
            # Cached blocks nobody references sit in the free list: taking them uses it up.
            cached_idle = sum(1 for b in cached if pool.blocks[b].ref_count == 0)
            if self.policy == "GUARANTEED_NO_EVICT":
                lifetime = self.blocks_for_lifetime(seq)
                if lifetime - len(cached) + cached_idle > pool.num_free - reserved:
                    break
                reserved += lifetime - pool.blocks_needed(num_cached + n)
            else:
                if pool.blocks_needed(num_cached + n) - len(cached) + cached_idle > pool.num_free:
                    break
            self.waiting.popleft()
            pool.take_cached(cached)
            seq.block_table = list(cached)
            seq.block_hashes = [pool.blocks[b].hash for b in cached]
            seq.num_computed = num_cached
            if not seq.counted_prompt:
                seq.num_cached_prompt = min(num_cached, len(seq.prompt_token_ids))
            for _ in range(pool.blocks_needed(num_cached + n) - len(cached)):
                seq.block_table.append(pool.allocate())
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, n, num_cached + n == len(tokens)))
            budget -= n
            fill.add(num_cached, n)
        return budget


@dataclasses.dataclass
class _StepFill:
    """What a step holds so far, for chunk_limit: its tokens and its prompt chunks' (query,
    key) pairs, over decodes reading `context` tokens."""

    context: int
    chunk_limit: Callable[[int, int, int, int, int], int] | None
    tokens: int = 0
    pairs: int = 0
    prompts: int = 0

    def limit(self, start: int, n: int, chunked: bool) -> int:
        """How many of n prompt tokens from position `start` the step may still take."""
        if self.chunk_limit is None:
            return n
        allowed = self.chunk_limit(self.context, self.tokens, self.pairs, start, n)
        if not self.prompts:  # prompts always move: the step's first chunk gets its minimum
            allowed = max(allowed, min(n, MIN_PREFILL_TOKENS))
        if allowed < n and not chunked:
            return 0
        return min(allowed, n)

    def add(self, start: int, n: int) -> None:
        self.tokens += n
        self.pairs += prompt_pairs(start, n)
        self.prompts += 1
