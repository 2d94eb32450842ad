"""Per-request block tables on top of the block pool: prefix lookup, allocate, free.

Block table of a request with block_size 4 and 10 tokens (3 blocks, the last one partial):

    tokens:      t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 .  .
    block_ids:   [    17     ,     3       ,    42     ]
    slot of t6 = block_ids[6 // 4] * 4 + 6 % 4 = 3 * 4 + 2 = 14
"""

from __future__ import annotations

from pinnace.runtime.core.block_pool import BlockPool, KVBlock, hash_block
from pinnace.runtime.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}.")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.enable_caching = enable_caching
        self._tables: dict[str, list[KVBlock]] = {}

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, req_id: str) -> list[int]:
        return [b.block_id for b in self._tables.get(req_id, [])]

    def _update_hashes(self, request: Request) -> None:
        """Extend request.block_hashes to cover every full block of its known tokens."""
        size = self.block_size
        hashes = request.block_hashes
        while (len(hashes) + 1) * size <= request.num_tokens:
            start = len(hashes) * size
            parent = hashes[-1] if hashes else None
            tokens = request.all_token_ids[start : start + size]
            hashes.append(hash_block(parent, tokens, _extra_key(request)))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of a new request, as blocks and a token count.

        At least one token is always left to compute: the model must run on the last
        prompt token to produce logits for sampling.
        """
        if not self.enable_caching:
            return [], 0
        self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count a lookup once its request was actually admitted (retries don't count)."""
        self.pool.num_queries += num_tokens
        self.pool.num_hits += num_hit_tokens

    def num_blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        total = request.num_computed_tokens + num_new_tokens
        have = len(self._tables.get(request.req_id, []))
        return max(0, -(-total // self.block_size) - have)

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: list[KVBlock] | None = None,
    ) -> bool:
        """Make room for `num_new_tokens` more tokens; False (and no change) if it can't.

        `computed_blocks` (from get_computed_blocks) become the head of a new request's
        table; the caller sets request.num_computed_tokens to match.
        """
        computed_blocks = computed_blocks or []
        table = self._tables.get(request.req_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_new_blocks = max(0, -(-total // self.block_size) - len(table) - len(computed_blocks))
        # Cached blocks that are free still count as free; reviving them uses them up.
        num_revived = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + num_revived > self.pool.num_free_blocks:
            return False
        self.pool.touch(computed_blocks)
        table = self._tables.setdefault(request.req_id, table)
        table.extend(computed_blocks)
        table.extend(self.pool.allocate(num_new_blocks))
        self._cache_full_blocks(request, table, total)
        return True

    def _cache_full_blocks(self, request: Request, table: list[KVBlock], total: int) -> None:
        # Tokens scheduled this step are already known, so their blocks can be keyed now.
        # A request admitted later in the same step may hit them: that is safe because
        # every attention backend writes the step's K/V into the cache before any token
        # of the step reads it (invariant of AttentionBackend.forward).
        if not self.enable_caching:
            return
        self._update_hashes(request)
        num_full = min(total // self.block_size, len(request.block_hashes))
        for i in range(num_full):
            self.pool.cache(table[i], request.block_hashes[i])

    def free(self, request: Request) -> None:
        """Release a request's blocks, tail first so its tail is evicted first."""
        table = self._tables.pop(request.req_id, [])
        self.pool.free(list(reversed(table)))


def _extra_key(request: Request) -> object:
    """What besides the tokens decides a block's KV: the cache salt and the LoRA adapter
    (its engine key is never reused, so no adapter hits another's or the base's blocks)."""
    if request.lora_id:
        return (request.cache_salt, request.lora_id)
    return request.cache_salt
