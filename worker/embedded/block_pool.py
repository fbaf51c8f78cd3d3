"""KvBlockPool: fixed-size KV blocks with ref counts and a prefix cache.

Each full block is keyed by a hash chained over its whole prefix. A block whose last
request ends keeps its contents and stays findable by hash until the pool needs it back,
least recently used first.
"""

from __future__ import annotations

from collections import OrderedDict

from inflight.prefix_hash import hash_block


class KvBlock:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


class KvBlockPool:
    def __init__(self, num_blocks: int, tokens_per_block: int, enable_reuse: bool = True):
        self.num_blocks = num_blocks
        self.tokens_per_block = tokens_per_block
        self.enable_reuse = enable_reuse
        self.blocks = [KvBlock(i) for i in range(num_blocks)]
        # Unreferenced blocks, least recently released first; some still hold a prefix.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.by_hash: dict[int, int] = {}
        self.reused = 0
        self.evicted = 0
        # Hashes stored and evicted since the worker last reported them (for routing).
        self.stored_events: list[int] = []
        self.removed_events: list[int] = []

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_cached(self) -> int:
        return len(self.by_hash)

    def drain_events(self) -> tuple[list[int], list[int]]:
        stored, removed = self.stored_events, self.removed_events
        self.stored_events, self.removed_events = [], []
        return stored, removed

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.tokens_per_block)

    def match_prefix(self, token_ids: list[int], max_blocks: int) -> list[int]:
        """Ids of cached blocks that hold the leading full blocks of `token_ids`."""
        if not self.enable_reuse:
            return []
        bs = self.tokens_per_block
        found: list[int] = []
        parent = 0
        for i in range(min(max_blocks, len(token_ids) // bs)):
            chunk = tuple(token_ids[i * bs : (i + 1) * bs])
            parent = hash_block(parent, chunk)
            block_id = self.by_hash.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            found.append(block_id)
        return found

    def take_cached(self, block_ids: list[int]) -> None:
        """Reference blocks returned by match_prefix for one more request."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        self.reused += len(block_ids)

    def allocate(self) -> int:
        """A fresh block; evicts the least recently released cached prefix if needed."""
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.by_hash.get(block.hash) == block_id:
                del self.by_hash[block.hash]
                self.removed_events.append(block.hash)
            block.hash = None
            block.token_ids = ()
            self.evicted += 1
        block.ref_count = 1
        return block_id

    def release(self, block_ids: list[int]) -> None:
        # Release tail first so that a prompt's later blocks are evicted before its head.
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} released twice"
            if block.ref_count == 0:
                self.free[block_id] = None

    def publish(self, block_id: int, parent_hash: int, token_ids: tuple[int, ...]) -> int:
        """Record a just-filled block so later requests can reuse it; returns its hash."""
        h = hash_block(parent_hash, token_ids)
        if self.enable_reuse:
            block = self.blocks[block_id]
            block.hash = h
            block.token_ids = token_ids
            if self.by_hash.setdefault(h, block_id) == block_id:
                self.stored_events.append(h)
                if len(self.stored_events) > 4 * self.num_blocks:  # nobody drains: offline use
                    self.drain_events()
        return h
