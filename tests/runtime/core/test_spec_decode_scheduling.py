"""Speculative decoding in the scheduler: proposals scheduled after the known tokens,
rolled back when rejected, never hashed into the prefix cache, and cut at max_tokens and
stops. The fake model (model_next_token) decides which proposals are right; the harness
checks every step's KV (a rolled-back slot read as if valid would fail it)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from pinnace.runtime.core.block_pool import hash_block
from pinnace.runtime.request import Request

K = 4
NextToken = Callable[[list[int]], int]


def proposer(
    next_token: NextToken, rng: random.Random, p_wrong: float
) -> Callable[[Request, list[int]], list[int]]:
    """Proposes the fake model's next K tokens, each replaced by a wrong one w.p. p_wrong."""

    def propose(request: Request, new: list[int]) -> list[int]:
        tokens = [*request.all_token_ids, *new]
        out = []
        for _ in range(K):
            token = next_token(tokens)
            out.append(token if rng.random() >= p_wrong else 7)
            tokens.append(token)
        return out

    return propose


def prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(1, 900) for _ in range(n)] for n in (3, 9, 17, 30, 41)]


def run(make_harness: Callable[..., Any], p_wrong: float | None, **kwargs: Any) -> Any:
    """All prompts to the end, without proposals (p_wrong None) or with them."""
    next_token = make_harness.model_next_token
    propose = None if p_wrong is None else proposer(next_token, random.Random(0), p_wrong)
    h = make_harness(sample=lambda r: next_token(r.all_token_ids), propose=propose, **kwargs)
    for i, prompt in enumerate(prompts()):
        h.add(f"r{i}", prompt, max_tokens=13 + i)
    h.run()
    h.assert_no_leaks()
    return h


def test_proposals_never_change_the_tokens_under_chunking_and_preemption(make_harness):
    # 16 blocks of 4 for ~175 tokens and a 12-token budget: chunks, preemptions, and
    # proposals the budget cuts short.
    small = dict(num_blocks=16, block_size=4, max_num_batched_tokens=12)
    expected = run(make_harness, None, num_blocks=64, block_size=4, max_model_len=64).emitted
    h = run(make_harness, 0.3, **small)
    assert h.emitted == expected
    assert h.scheduler.num_preemptions > 0
    spec = h.scheduler.stats().spec_decoding
    assert 0 < spec.num_accepted_tokens < spec.num_draft_tokens
    assert spec.num_accepted_tokens_per_pos[0] >= spec.num_accepted_tokens_per_pos[-1]
    assert sum(spec.num_accepted_tokens_per_pos) == spec.num_accepted_tokens
    # Fewer steps than tokens: accepted proposals arrive several per step.
    steps_with_many = sum(
        1 for out in h.history for s in out.scheduled if len(s.spec_token_ids) > 1
    )
    assert steps_with_many > 0


def test_max_tokens_and_stop_tokens_landing_mid_proposal(make_harness):
    reference = run(make_harness, None, num_blocks=64, block_size=4).emitted["r4"]
    stop = reference[5]
    assert stop not in reference[:5]
    next_token = make_harness.model_next_token
    for p_wrong in (0.0, 0.3):
        h = make_harness(
            num_blocks=64,
            block_size=4,
            propose=proposer(next_token, random.Random(1), p_wrong),
            sample=lambda r: next_token(r.all_token_ids),
        )
        h.add("len", prompts()[4], max_tokens=7)  # 1 + 4 + 2: the 2nd step's cut
        h.add("stop", prompts()[4], max_tokens=20, stop_token_ids=[stop])
        h.run()
        assert h.emitted["len"] == reference[:7]
        assert h.finish_reasons["len"] == "length"
        assert h.emitted["stop"] == reference[:6]
        assert h.finish_reasons["stop"] == "stop" and h.stop_reasons["stop"] == stop
        h.assert_no_leaks()


def test_prefix_cache_holds_only_blocks_of_accepted_tokens(make_harness):
    h = run(make_harness, 0.6, num_blocks=64, block_size=4)
    # Every hash in the cache is a block-aligned prefix of some request's known tokens.
    accepted: set[bytes] = set()
    for request in h.all_requests.values():
        parent = None
        tokens = request.all_token_ids
        for start in range(0, len(tokens) - 3, 4):
            parent = hash_block(parent, tokens[start : start + 4], None)
            accepted.add(parent)
    cached = {b.block_hash for b in h.kv.pool.blocks if b.block_hash is not None}
    assert cached and cached <= accepted
    # A second pass over prompt + output hits those blocks; the harness checks their KV.
    hits = h.kv.pool.num_hits
    for req_id, request in list(h.all_requests.items()):
        h.add(f"again-{req_id}", request.all_token_ids, max_tokens=3)
    h.run()
    assert h.kv.pool.num_hits > hits
    h.assert_no_leaks()
