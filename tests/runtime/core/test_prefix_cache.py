"""Automatic prefix caching: exact hit counts, full blocks only, LRU eviction, salts."""

from __future__ import annotations

import pytest

from pinnace.runtime.core.block_pool import BlockPool, hash_block
from pinnace.runtime.core.kv_cache_manager import KVCacheManager
from pinnace.runtime.request import Request
from pinnace.runtime.sampling_params import SamplingParams

BASE = list(range(1, 11))  # 10 tokens: 2 full blocks of 4 + 2


def request(req_id: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(req_id, tokens, SamplingParams(), cache_salt=salt)


def admit(kv: KVCacheManager, req: Request) -> int:
    """Admit like the scheduler does; returns the hit length."""
    blocks, num_hit = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - num_hit, blocks)
    req.num_computed_tokens = num_hit
    return num_hit


@pytest.mark.parametrize(
    ("tokens", "num_hit"),
    [
        ([*BASE, 11, 12], 8),  # shares 10 tokens: only the 2 full blocks count
        ([*BASE[:9], 50, 51, 52], 8),  # shares 9 tokens
        (BASE[:7] + [50] * 5, 4),  # shares 7 tokens: one full block
        (BASE[:3], 0),  # shorter than a block
        (BASE[:8], 4),  # 2 blocks match, but the last token must be computed
        (BASE[:9], 8),
        ([99, *BASE[1:]], 0),  # the first block differs: the chain never starts
        ([*BASE[:4], 99, *BASE[5:]], 4),  # 2nd differs; the 3rd can't match after it
    ],
)
def test_prefix_hits_are_counted_in_full_blocks_leaving_a_token(tokens, num_hit):
    kv = KVCacheManager(num_blocks=16, block_size=4)
    owner = request("owner", [*BASE, 11, 12, 13])  # 13 tokens: 3 full blocks cached
    admit(kv, owner)
    owner_ids = kv.block_ids("owner")
    kv.free(owner)  # freed blocks keep their hashes until reused
    probe = request("probe", tokens)
    blocks, hit = kv.get_computed_blocks(probe)
    assert hit == num_hit == len(blocks) * 4
    assert [b.block_id for b in blocks] == owner_ids[: len(blocks)]
    assert admit(kv, probe) == num_hit
    assert kv.block_ids("probe")[: len(blocks)] == owner_ids[: len(blocks)]


def test_hits_reuse_the_same_physical_blocks_and_take_a_reference():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    owner, probe = request("owner", BASE), request("probe", [*BASE[:9], 77])
    admit(kv, owner)
    assert admit(kv, probe) == 8
    assert kv.block_ids("probe")[:2] == kv.block_ids("owner")[:2]
    assert kv.block_ids("probe")[2] != kv.block_ids("owner")[2]
    assert [kv.pool.blocks[b].ref_cnt for b in kv.block_ids("owner")] == [2, 2, 1]
    kv.free(owner)
    kv.free(probe)
    assert kv.pool.num_free_blocks == 16
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)


def test_scheduler_counts_queries_and_hits_in_tokens(make_harness):
    h = make_harness(num_blocks=32, block_size=4)
    prompts = {
        "a": [*BASE, 11, 12],  # 12 tokens, first: no hit
        "b": [*BASE[:9], 50, 51, 52],  # 8
        "c": [*BASE, 11, 12],  # same as a: 8 (not 12: one token is recomputed)
        "d": [*BASE, 11, 12, 13],  # 12
        "e": [500, 501, 502, 503, 504],  # unrelated: 0
    }
    for req_id, tokens in prompts.items():
        h.add(req_id, tokens, max_tokens=2)
        h.run()
    cached = {r: h.all_requests[r].num_cached_tokens for r in prompts}
    assert cached == {"a": 0, "b": 8, "c": 8, "d": 12, "e": 0}
    stats = h.scheduler.stats()
    assert stats.prefix_cache_queries == sum(len(t) for t in prompts.values())
    assert stats.prefix_cache_hits == 28
    h.assert_no_leaks()


def test_a_request_that_waits_for_blocks_is_queried_once_admitted(make_harness):
    h = make_harness(num_blocks=4, block_size=4)
    # "holder" takes 3 blocks, then the 4th for its decode; "waiter" needs 2 and is
    # refused twice: those retries are not lookups.
    h.add("holder", list(range(12)), max_tokens=2)
    h.add("waiter", list(range(100, 108)), max_tokens=1)
    h.step()
    for _ in range(2):
        assert h.scheduler.stats().prefix_cache_queries == 12
        h.step()
    h.run()
    assert h.scheduler.stats().prefix_cache_queries == 20
    h.assert_no_leaks()


def test_least_recently_freed_cached_blocks_are_evicted_first():
    # 6 blocks. Two finished requests leave 2 cached blocks each; fresh allocations then
    # use the never-cached blocks, then evict "old"'s blocks (freed first, tail first),
    # and only then "recent"'s.
    kv = KVCacheManager(num_blocks=6, block_size=4)
    old_tokens, recent_tokens = list(range(1, 9)), list(range(101, 109))
    for req_id, tokens in (("old", old_tokens), ("recent", recent_tokens)):
        req = request(req_id, tokens)
        admit(kv, req)
        kv.free(req)
    assert kv.pool.num_free_blocks == 6

    def hits(tokens: list[int]) -> int:
        return kv.get_computed_blocks(request("probe", [*tokens, 0]))[1]

    assert (hits(old_tokens), hits(recent_tokens)) == (8, 8)
    fillers = []
    for i, expected in enumerate([(8, 8), (8, 8), (4, 8), (0, 8), (0, 4), (0, 0)]):
        filler = request(f"filler{i}", [1000 + i] * 3)  # never a full block: never cached
        admit(kv, filler)
        fillers.append(filler)
        assert (hits(old_tokens), hits(recent_tokens)) == expected, i
    for filler in fillers:
        kv.free(filler)
    assert kv.pool.num_free_blocks == 6


def test_a_hit_refreshes_a_block_in_the_lru_order():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a, b = list(range(1, 5)), list(range(11, 15))  # one full block each
    for req_id, tokens in (("a", a), ("b", b), ("a-again", a)):
        req = request(req_id, [*tokens, 0])  # 5 tokens: 1 cached block + 1 partial
        admit(kv, req)
        kv.free(req)
    # "a-again" revived a's block: b's is now the least recently used cached block.
    pressure = request("pressure", [900] * 3 + [901] * 3 + [902] * 3)
    admit(kv, pressure)  # takes b's partial block, b's cached block, a's partial block
    assert kv.get_computed_blocks(request("pa", [*a, 5]))[1] == 4
    assert kv.get_computed_blocks(request("pb", [*b, 5]))[1] == 0


def test_evicted_prefix_is_no_longer_a_hit_in_the_scheduler(make_harness):
    h = make_harness(num_blocks=6, block_size=4)
    shared = list(range(1, 13))  # 3 full blocks
    h.add("first", [*shared, 13], max_tokens=1)
    h.run()
    h.add("hit", [*shared, 14], max_tokens=1)
    h.run()
    assert h.all_requests["hit"].num_cached_tokens == 12
    h.add("pressure", list(range(500, 523)), max_tokens=1)  # 23 tokens: all 6 blocks
    h.run()
    h.add("miss", [*shared, 15], max_tokens=1)
    h.run()
    assert h.all_requests["miss"].num_cached_tokens == 0
    h.assert_no_leaks()


def test_cache_salt_and_caching_switch():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    admit(kv, request("alice", BASE, salt="alice"))
    assert kv.get_computed_blocks(request("p1", BASE, salt="alice"))[1] == 8
    assert kv.get_computed_blocks(request("p2", BASE, salt="bob"))[1] == 0
    assert kv.get_computed_blocks(request("p3", BASE))[1] == 0
    off = KVCacheManager(num_blocks=16, block_size=4, enable_caching=False)
    admit(off, request("owner", BASE))
    assert off.get_computed_blocks(request("p4", BASE))[1] == 0
    assert all(b.block_hash is None for b in off.pool.blocks)


def test_block_hash_chains_parent_tokens_and_extra_key():
    h = hash_block(None, [1, 2, 3, 4])
    assert h == hash_block(None, (1, 2, 3, 4))
    assert h != hash_block(None, [1, 2, 3, 5])
    assert h != hash_block(b"parent", [1, 2, 3, 4])
    assert h != hash_block(None, [1, 2, 3, 4], "salt")
    assert hash_block(h, [5]) != hash_block(hash_block(None, [9, 9, 9, 9]), [5])


def test_block_pool_ref_counts_and_errors():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.num_free_blocks == 1 and pool.usage == 0.75
    with pytest.raises(RuntimeError, match="asked for 2 blocks, 1 free"):
        pool.allocate(2)
    pool.touch(blocks[:1])
    pool.free(blocks)
    assert blocks[0].ref_cnt == 1 and pool.num_free_blocks == 3
    pool.free(blocks[:1])
    assert pool.num_free_blocks == 4
    with pytest.raises(RuntimeError, match="freed more often than taken"):
        pool.free(blocks[:1])
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(num_blocks=4, block_size=0)


def test_block_pool_first_writer_wins_and_reset():
    pool = BlockPool(4)
    first, second = pool.allocate(2)
    pool.cache(first, b"h")
    pool.cache(second, b"h")  # duplicate content: stays private
    assert pool.lookup(b"h") is first and second.block_hash is None
    assert not pool.reset_prefix_cache()  # blocks in use
    pool.free([first, second])
    assert pool.lookup(b"h") is first  # free but still cached
    assert pool.reset_prefix_cache()
    assert pool.lookup(b"h") is None and first.block_hash is None
