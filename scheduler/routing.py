"""Routing: send a request where most of its prompt is already cached, unless that worker
is much busier than the least busy one; otherwise to the least busy worker. (A short
shared prefix, such as a default system prompt, must not pull every request to one
worker, hence the threshold on the cached share of the prompt, as SGLang's router does.)"""

from __future__ import annotations

import dataclasses
import time

from inflight import schema
from inflight.prefix_hash import block_hashes


@dataclasses.dataclass
class WorkerState:
    identity: bytes
    info: schema.WorkerHello
    capacity: int  # requests it may hold at once (running plus its own queue)
    last_seen: float = dataclasses.field(default_factory=time.monotonic)
    last_progress: float = dataclasses.field(default_factory=time.monotonic)  # last token from it, or its first request
    requests: set[str] = dataclasses.field(default_factory=set)  # ids routed here and not finished
    cached: set[int] = dataclasses.field(default_factory=set)  # prefix block hashes it holds
    assigned: int = 0  # requests ever routed here; breaks ties so idle workers take turns
    leaving: bool = False  # draining before it stops: nothing new is routed here

    @property
    def has_room(self) -> bool:
        return not self.leaving and len(self.requests) < self.capacity

    def prefix_match(self, hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.cached:
                break
            n += 1
        return n


def route_by_prefix(prompt: list[int], workers: list[WorkerState], balance_slack: int,
                    cache_threshold: float = 0.5) -> tuple[WorkerState | None, int]:
    """The worker to take the prompt, and how many of its blocks that worker has cached."""
    available = [w for w in workers if w.has_room]
    if not available:
        return None, 0
    hashes_by_size: dict[int, list[int]] = {}
    matched = {}
    for w in available:
        size = w.info.tokens_per_block
        if size not in hashes_by_size:
            hashes_by_size[size] = block_hashes(prompt, size)
        matched[w.identity] = w.prefix_match(hashes_by_size[size])
    least = min(available, key=lambda w: (len(w.requests), w.assigned))
    best = max(available, key=lambda w: (matched[w.identity], -len(w.requests), -w.assigned))
    cached_share = matched[best.identity] * best.info.tokens_per_block / len(prompt)
    if cached_share < cache_threshold or len(best.requests) - len(least.requests) > balance_slack:
        best = least
    # Count the prompt's blocks as cached there now, so followers sharing it come along
    # before the worker's own report arrives.
    best.cached.update(hashes_by_size[best.info.tokens_per_block])
    best.assigned += 1
    return best, matched[best.identity]
