"""Hashes of full KV blocks, each chained to its whole prefix.

Workers key their prefix cache with these and report them; the scheduler computes the
same hashes for an incoming prompt to route it where its prefix is already cached.
"""

from __future__ import annotations

import hashlib
from array import array


def hash_block(parent: int, token_ids) -> int:
    h = hashlib.blake2b(parent.to_bytes(8, "little"), digest_size=8)
    h.update(array("I", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


def block_hashes(token_ids: list[int], tokens_per_block: int, limit: int | None = None) -> list[int]:
    """Chained hashes of every full block of `token_ids` (at most `limit` blocks)."""
    n = len(token_ids) // tokens_per_block
    if limit is not None:
        n = min(n, limit)
    out: list[int] = []
    parent = 0
    for i in range(n):
        parent = hash_block(parent, token_ids[i * tokens_per_block : (i + 1) * tokens_per_block])
        out.append(parent)
    return out
