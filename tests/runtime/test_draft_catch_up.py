"""A draft model skipped above `disable_by_batch_size` catches up when the batch shrinks
(runtime/spec_decode/draft_model_proposer.py): greedy outputs stay the target's, and
with the target as its own draft every proposal after the catch-up is accepted, which
holds only if the caught-up draft KV is right (a wrong one shows as rejections; the
verification would hide it from the tokens)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.engine.llm_engine import LLMEngine
from pinnace.runtime.spec_decode.draft_model_proposer import DraftModelProposer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

BLOCK = 16


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _prompt(seed: int, length: int) -> list[int]:
    return [1000 + (37 * i + 101 * seed) % 5000 for i in range(length)]


def _self_drafting(path: str, disable_by_batch_size: int) -> LLM:
    """The target as its own draft: its proposals are the target's greedy tokens."""
    spec = {
        "model": path,
        "num_speculative_tokens": 3,
        "disable_by_batch_size": disable_by_batch_size,
    }
    return LLM(path, dtype="float32", kv_cache_memory=4 * 2**20, speculative_config=spec)


def _draft(engine: LLMEngine) -> DraftModelProposer:
    proposer = engine.runner.proposer
    assert isinstance(proposer, DraftModelProposer)
    return proposer


def test_the_draft_skips_big_batches_and_catches_up_when_the_batch_shrinks(
    make_tiny_model: Callable[[str], Path],
) -> None:
    path = str(make_tiny_model("LlamaForCausalLM"))
    # Two long requests speculate alone, two short ones join (4 sampling > 2: no draft),
    # finish one after the other, and the long ones speculate again after a catch-up.
    jobs = {
        "long-a": (_prompt(0, 20), 36, 0),  # prompt, max_tokens, arrival step
        "long-b": (_prompt(1, 27), 40, 0),
        "short-a": (_prompt(2, 18), 6, 2),
        "short-b": (_prompt(3, 33), 12, 2),
    }
    base = LLM(path, dtype="float32", kv_cache_memory=4 * 2**20)
    want = {
        rid: base.generate([p], _greedy(n), use_tqdm=False)[0].outputs[0].token_ids
        for rid, (p, n, _) in jobs.items()
    }
    engine = _self_drafting(path, disable_by_batch_size=2).llm_engine
    draft = _draft(engine)
    got: dict[str, list[int]] = {}
    step, resumed, skipped = 0, None, 0
    while step <= 2 or engine.has_unfinished_requests():
        for rid, (prompt, n, at) in jobs.items():
            if at == step:
                engine.add_request(rid, prompt, _greedy(n))
        forward_rows = draft.counters.num_forward_tokens
        catch_up = draft.counters.num_catch_up_tokens
        outputs = engine.step()
        if len(outputs) > 2:  # more than 2 requests sampled: the draft must not run
            assert draft.counters.num_forward_tokens == forward_rows, f"step {step}"
            skipped += 1
        elif resumed is None and draft.counters.num_catch_up_tokens > catch_up:
            resumed = (step, engine.stats().spec_decoding)
        got.update({o.request_id: o.outputs[0].token_ids for o in outputs if o.finished})
        step += 1
    assert got == want
    assert skipped >= 6 and resumed is not None
    # The catch-up covered the tokens both long requests decoded while skipped.
    assert draft.counters.num_catch_up_tokens >= 2 * (skipped - 1)
    # After the catch-up the draft still proposes the target's tokens, every one.
    before, after = resumed[1], engine.stats().spec_decoding
    assert after.num_draft_tokens - before.num_draft_tokens >= 12
    assert after.num_accepted_tokens - before.num_accepted_tokens == (
        after.num_draft_tokens - before.num_draft_tokens
    )
    assert 0 < after.num_accepted_tokens == after.num_draft_tokens


# 8: the 48-token catch-up spreads over 6 steps, without proposals until it is done.
@pytest.mark.parametrize("max_catch_up_tokens", [2048, 8])
def test_prefix_hits_on_blocks_the_draft_skipped_are_caught_up_and_valid_ones_reused(
    make_tiny_model: Callable[[str], Path], max_catch_up_tokens: int
) -> None:
    path = str(make_tiny_model("LlamaForCausalLM"))
    shared = _prompt(5, 3 * BLOCK)  # 3 full blocks
    tails = [_prompt(6 + i, 5) for i in range(3)]
    base = LLM(path, dtype="float32", kv_cache_memory=4 * 2**20)
    prompt = shared + _prompt(9, 7)
    want = base.generate([prompt], _greedy(12), use_tqdm=False)[0].outputs[0].token_ids
    llm = _self_drafting(path, disable_by_batch_size=2)
    draft = _draft(llm.llm_engine)
    draft.max_catch_up_tokens = max_catch_up_tokens
    # Three requests at once: the target writes the shared blocks, the draft never runs.
    llm.generate([shared + t for t in tails], _greedy(4), use_tqdm=False)
    assert draft.counters.num_forward_tokens == 0
    hits = llm.llm_engine.stats().prefix_cache_hits
    # Alone, it speculates: its hit blocks hold target KV only, so the draft computes them.
    out = llm.generate([prompt], _greedy(12), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == want
    assert llm.llm_engine.stats().prefix_cache_hits >= hits + 3 * BLOCK
    assert draft.counters.num_catch_up_tokens >= 3 * BLOCK
    sd = llm.llm_engine.stats().spec_decoding
    assert 0 < sd.num_accepted_tokens == sd.num_draft_tokens
    # Again: the blocks now hold the draft's KV too, so nothing is caught up.
    caught_up = draft.counters.num_catch_up_tokens
    again = llm.generate([prompt], _greedy(12), use_tqdm=False)[0].outputs[0]
    assert again.token_ids == want
    assert draft.counters.num_catch_up_tokens == caught_up
    sd = llm.llm_engine.stats().spec_decoding
    assert 0 < sd.num_accepted_tokens == sd.num_draft_tokens
