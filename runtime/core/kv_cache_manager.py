"""Per-request block tables on top of the block pool: prefix lookup, allocate, free.

Block table of a request with block_size 4 and 10 tokens (3 blocks, the last one partial):

    tokens:      t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 .  .
    block_ids:   [    17     ,     3       ,    42     ]
    slot of t6 = block_ids[6 // 4] * 4 + 6 % 4 = 3 * 4 + 2 = 14

With a sliding window W on every layer, a query at position p reads keys p - W + 1 .. p
only, so once a request has computed n tokens, blocks ending before n - W + 1 are never
read again: they go back to the pool (still hashed, so a prefix may hit them until they
are evicted) and their place in the table keeps a placeholder (position arithmetic is
unchanged; attention masks those positions, so the id it reads there does not matter):

    W = 8, n = 14: the first position still read is 14 - 8 + 1 = 7, so block 0 (t0-t3) goes
    [ 17, 3, 42, 9 ]  ->  [ None, 3, 42, 9 ]      (17 back in the pool)
"""

from __future__ import annotations

from pinnace.runtime.core.block_pool import BlockPool, KVBlock, hash_block
from pinnace.runtime.request import Request

# The block id given for a released block's place (any valid id: it is masked, never written).
RELEASED_BLOCK_ID = 0


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        sliding_window: int | None = None,  # set only when every layer has this window
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}.")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.enable_caching = enable_caching
        self.sliding_window = sliding_window
        self.num_released_blocks = 0  # released early, outside the window (a counter)
        self._tables: dict[str, list[KVBlock | None]] = {}

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, req_id: str) -> list[int]:
        table = self._tables.get(req_id, [])
        return [RELEASED_BLOCK_ID if b is None else b.block_id for b in table]

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
        num_lookahead_tokens: int = 0,
    ) -> bool:
        """Make room for `num_new_tokens` more tokens; False (and no change) if it can't.

        `computed_blocks` (from get_computed_blocks) become the head of a new request's
        table; the caller sets request.num_computed_tokens to match. `num_lookahead_tokens`
        more slots are reserved past them (a draft model's proposals write KV there).
        """
        computed_blocks = computed_blocks or []
        table = self._tables.get(request.req_id, [])
        self._release_outside_window(table, request.num_computed_tokens)
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        reserved = total + num_lookahead_tokens
        num_new_blocks = max(0, -(-reserved // self.block_size) - len(table) - len(computed_blocks))
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

    def _release_outside_window(self, table: list[KVBlock | None], num_computed: int) -> None:
        """Free the blocks no query from position `num_computed` on can see (see top)."""
        if self.sliding_window is None:
            return
        first_needed = max(0, num_computed - self.sliding_window + 1)
        num_outside = min(first_needed // self.block_size, len(table))
        released: list[KVBlock] = []
        for i in range(num_outside):
            block = table[i]
            if block is not None:
                released.append(block)
                table[i] = None
        if released:
            self.pool.free(released)
            self.num_released_blocks += len(released)

    def _cache_full_blocks(self, request: Request, table: list[KVBlock | None], total: int) -> None:
        # Tokens scheduled this step are already known, so their blocks can be keyed now.
        # A request admitted later in the same step may hit them: that is safe because
        # every attention backend writes the step's K/V into the cache before any token
        # of the step reads it (invariant of AttentionBackend.forward).
        if not self.enable_caching:
            return
        self._update_hashes(request)
        num_full = min(total // self.block_size, len(request.block_hashes))
        for i in range(num_full):
            block = table[i]
            if block is not None:
                self.pool.cache(block, request.block_hashes[i])

    def free(self, request: Request) -> None:
        """Release a request's blocks, tail first so its tail is evicted first."""
        table = self._tables.pop(request.req_id, [])
        self.pool.free([b for b in reversed(table) if b is not None])


def _extra_key(request: Request) -> object:
    """What besides the tokens decides a block's KV: the cache salt and the LoRA adapter
    (its engine key is never reused, so no adapter hits another's or the base's blocks)."""
    if request.lora_id:
        return (request.cache_salt, request.lora_id)
    return request.cache_salt
