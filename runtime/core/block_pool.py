"""The KV block pool: ref counts, a free queue in eviction order, and the prefix-cache map."""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra_key: object = None) -> bytes:
    """Chained hash of a full block: equal hashes mean equal prefixes (and equal extra key).

    sha256 rather than Python's `hash` because a collision would silently serve another
    prompt's KV.
    """
    payload = pickle.dumps((parent, tuple(token_ids), extra_key), protocol=5)
    return hashlib.sha256(payload).digest()


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None  # set once the block is full and registered in the cache


class BlockPool:
    """Owns every KV block.

    A block is *free* when no request references it (ref_cnt == 0). Free blocks sit in
    `_free` in eviction order: the oldest-freed first. A free block that still carries a
    hash keeps its KV and can be revived by a prefix hit until it is handed out again
    (LRU eviction of the prefix cache).
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}.")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, KVBlock] = {}
        self.num_queries = 0  # prefix-cache lookups, in tokens
        self.num_hits = 0  # tokens served from the prefix cache

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def cached_block_hashes(self) -> set[bytes]:
        """The hashes a prefix lookup can hit now."""
        return set(self._cached)

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Hand out `num_blocks` fresh blocks, evicting the least recently freed first."""
        if num_blocks > len(self._free):
            raise RuntimeError(f"asked for {num_blocks} blocks, {len(self._free)} free")
        out = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Sequence[KVBlock]) -> None:
        """Take a reference on cached blocks found by a prefix hit."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Sequence[KVBlock]) -> None:
        """Drop one reference on each block; pass them tail first so tails are evicted first."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"block {block.block_id} freed more often than taken")
            if block.ref_cnt == 0:
                self._free[block.block_id] = None

    def cache(self, block: KVBlock, block_hash: bytes) -> None:
        """Register a full block under its hash (first writer wins; duplicates stay private)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash not in self._cached:
            block.block_hash = block_hash
            self._cached[block_hash] = block

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
            block.block_hash = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only allowed when no block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
        return True
