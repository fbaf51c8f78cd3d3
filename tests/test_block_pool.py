"""KvBlockPool: ref counts, prefix matching by chained hash, LRU eviction."""

from inflight.prefix_hash import block_hashes
from worker.embedded.block_pool import KvBlockPool


def fill(pool: KvBlockPool, tokens: list[int]) -> list[int]:
    """Allocate and publish blocks for tokens, as the engine does after computing them."""
    bs = pool.tokens_per_block
    ids, parent = [], 0
    for i in range(len(tokens) // bs):
        b = pool.allocate()
        parent = pool.publish(b, parent, tuple(tokens[i * bs : (i + 1) * bs]))
        ids.append(b)
    return ids


def test_allocate_release_counts():
    pool = KvBlockPool(4, 2)
    a, b = pool.allocate(), pool.allocate()
    assert pool.num_free == 2 and a != b
    pool.release([a, b])
    assert pool.num_free == 4


def test_prefix_match_and_reuse():
    pool = KvBlockPool(8, 2)
    ids = fill(pool, [1, 2, 3, 4, 5, 6])
    assert pool.match_prefix([1, 2, 3, 4, 9, 9], 10) == ids[:2]
    assert pool.match_prefix([1, 2, 3, 4, 5, 6, 7], 10) == ids
    assert pool.match_prefix([1, 2, 3, 4, 5, 6], 2) == ids[:2]  # capped
    assert pool.match_prefix([2, 1, 3, 4], 10) == []
    pool.release(ids)
    # Released blocks stay findable and are taken back without reallocation.
    found = pool.match_prefix([1, 2, 3, 4], 10)
    assert found == ids[:2]
    pool.take_cached(found)
    assert pool.reused == 2
    assert pool.num_free == 8 - 2


def test_same_block_content_at_other_position_does_not_match():
    pool = KvBlockPool(8, 2)
    fill(pool, [7, 7, 1, 2])
    assert pool.match_prefix([1, 2], 10) == []  # [1, 2] was cached only after [7, 7]


def test_lru_eviction_order():
    pool = KvBlockPool(3, 1)
    first = fill(pool, [1])
    pool.release(first)
    second = fill(pool, [2])
    pool.release(second)
    third = fill(pool, [3])  # takes the never-used block
    assert pool.evicted == 0
    pool.release(third)
    pool.allocate()  # evicts the least recently released: [1]
    assert pool.evicted == 1
    assert pool.match_prefix([1], 1) == []
    assert pool.match_prefix([2], 1) == second


def test_reuse_disabled():
    pool = KvBlockPool(4, 2, enable_reuse=False)
    ids = fill(pool, [1, 2, 3, 4])
    pool.release(ids)
    assert pool.match_prefix([1, 2, 3, 4, 5], 10) == []


def test_scheduler_hashes_equal_pool_hashes():
    pool = KvBlockPool(8, 3)
    tokens = list(range(10))
    fill(pool, tokens)
    assert [pool.blocks[b].hash for b in pool.match_prefix(tokens, 10)] == block_hashes(tokens, 3)
