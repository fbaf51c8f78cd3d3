"""Iteration-level scheduling: which requests run in the next engine step, and how far.

Each step has a token budget (`max_num_tokens`). Running requests go first, in the order
they were admitted (a decode costs one token, an unfinished prefill continues in chunks),
then waiting requests are admitted first come, first served. Capacity policies as
TensorRT-LLM names them:
- GUARANTEED_NO_EVICT admits a request only if its whole future (prompt + max_tokens)
  fits beside what running requests may still claim, so nobody is ever preempted;
- MAX_UTILIZATION admits whatever fits now and, when blocks run out, preempts the newest
  request: its blocks are freed and it is recomputed later, keeping its tokens.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from worker.embedded.block_pool import KvBlockPool
from worker.embedded.sequence import Sequence, SeqStatus


@dataclasses.dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens to compute this step, starting at seq.num_computed
    sample: bool  # the chunk reaches the sequence's end, so a token is sampled


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
    ):
        self.pool = pool
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
        budget = self.max_num_tokens
        chunks: list[ScheduledChunk] = []
        finishing = 0
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.done_by_length(self.max_seq_len):  # its last token is still on the device
                finishing += 1
                i += 1
                continue
            n = seq.num_uncomputed
            if n > budget:
                if not self.chunked:
                    i += 1
                    continue
                n = budget
            if not self._grow(seq, seq.num_computed + n):
                break  # seq itself was preempted; everything after it too
            chunks.append(ScheduledChunk(seq, n, seq.num_computed + n == len(seq)))
            budget -= n
            i += 1
        if len(chunks) + finishing == len(self.running):
            budget = self._admit(chunks, budget)
        return chunks

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give seq blocks for num_tokens, preempting newer requests if needed."""
        need = self.pool.blocks_needed(num_tokens) - len(seq.block_table)
        while self.pool.num_free < need:
            victim = self.running[-1]
            self._preempt(victim)
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

    def _admit(self, chunks: list[ScheduledChunk], budget: int) -> int:
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
        return budget
