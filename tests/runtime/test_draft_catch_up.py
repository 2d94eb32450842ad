"""A draft model skipped above `disable_by_batch_size` catches up when the batch shrinks
(runtime/spec_decode/draft_model_proposer.py): greedy outputs stay the target's, and
with the target as its own draft every proposal after the catch-up is accepted, which
holds only if the caught-up draft KV is right (a wrong one shows as rejections; the
verification would hide it from the tokens)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.core.kv_cache_manager import RELEASED_BLOCK_ID
from pinnace.runtime.core.outputs import ScheduledRequest
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


WINDOW = 8


@pytest.fixture(scope="module")
def windowed(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A 2-layer Mistral whose every layer has an 8-token window, so the KV manager
    releases the blocks outside it (vocabulary 512, the real tokenizer)."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        sliding_window=WINDOW, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
        architectures=["MistralForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("windowed")
    MistralForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_catch_up_past_the_window_reads_no_released_block(windowed: Path, dtype: str) -> None:
    """A request whose draft lags 36 tokens (skipped steps) under a window of 8: its first
    7 blocks are released, their table entries the placeholder id, whose block holds
    another request's draft KV. What the catch-up writes and proposes must not depend on
    that block (noise or zeros there: the same draft KV and proposals). Then a 4-row
    catch-up (rejected proposals), which bfloat16 runs in the native Llama decode."""
    spec = {"model": str(windowed), "num_speculative_tokens": 3}
    llm = LLM(str(windowed), dtype=dtype, block_size=4, num_kv_blocks=32, speculative_config=spec)
    draft = _draft(llm.llm_engine)
    assert draft.sliding_window == WINDOW
    prompt = [3 + 37 * i % 500 for i in range(40)]
    table = [RELEASED_BLOCK_ID] * 7 + [20, 21, 22, 23]  # 36 - 8 + 1 = 29: block 7 on kept
    item = ScheduledRequest("a", prompt[36:], 36, table, _greedy(8), needs_sample=True,
                            prompt_token_ids=prompt)  # fmt: skip

    def catch_up(fill: Callable[[torch.Tensor], object]) -> tuple[list[int], list[torch.Tensor]]:
        for cache in draft.kv_caches:
            fill(cache)
        draft.valid_blocks[:] = bytes(len(draft.valid_blocks))
        draft.begin_step([item], gone={"a"})  # a fresh state: nothing draft-computed
        proposals = draft.propose([item], [[77]])[0]  # rows 28..40
        draft._states["a"].computed, draft._states["a"].tail = 37, []
        proposals += draft.propose([item], [[77]])[0]  # rows 37..40
        return proposals, [cache[:, 20:23].float() for cache in draft.kv_caches]

    gen = torch.Generator().manual_seed(0)
    noise = catch_up(lambda c: c.copy_(torch.randn(c.shape, generator=gen)))
    zeros = catch_up(lambda c: c.zero_())
    assert draft.counters.num_catch_up_tokens == 2 * (36 - 28)  # from the first kept block
    assert len(noise[0]) == 6 and noise[0] == zeros[0]
    for layer, (a, b) in enumerate(zip(noise[1], zeros[1], strict=True)):
        assert torch.equal(a, b), f"draft layer {layer}: the catch-up read a released block"


def _long_proposals_after(
    windowed: Path, first: list[int], prompts: list[list[int]], params: list[SamplingParams]
) -> tuple[list[list[int]], list[list[int]]]:
    """With `first` run alone before: the tokens of `prompts` and the first prompt's
    proposals step by step, checking that its draft caught up over released blocks."""
    spec = {"model": str(windowed), "num_speculative_tokens": 3, "disable_by_batch_size": 1}
    llm = LLM(str(windowed), dtype="float32", block_size=4, num_kv_blocks=32,
              speculative_config=spec)  # fmt: skip
    draft = _draft(llm.llm_engine)
    piece, propose = draft._piece, draft.propose
    behind: list[int] = []  # per piece: how far the draft was behind the first kept block
    proposed: list[list[int]] = []

    def recording_piece(item: ScheduledRequest, *args: Any) -> Any:
        behind.append(draft._first_kept_position(item) - (draft.draft_computed(item.req_id) or 0))
        return piece(item, *args)

    def recording_propose(items: list[ScheduledRequest], *args: Any) -> list[list[int]]:
        out = propose(items, *args)
        proposed.extend(
            p for item, p in zip(items, out, strict=True) if item.prompt_token_ids == prompts[0]
        )
        return out

    draft._piece = recording_piece  # type: ignore[method-assign]
    draft.propose = recording_propose  # type: ignore[method-assign]
    llm.generate([first], _greedy(8), use_tqdm=False)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert max(behind) > WINDOW  # a catch-up over released blocks
    assert llm.llm_engine.core.scheduler.kv.num_released_blocks > 0
    return got, proposed


def test_a_windowed_catch_up_through_the_engine_ignores_other_requests(windowed: Path) -> None:
    """Through the engine: a first request runs alone (its draft writes block 0, the id
    released blocks' places keep), then two sample together (above disable_by_batch_size=1:
    no draft) until the short one ends, and the long one's draft catches up from more than
    a window behind. Its proposals must not depend on what the first request was, and the
    tokens are those without speculation."""
    prompts = [[3 + 37 * i % 500 for i in range(10)], [5 + 11 * i % 500 for i in range(30)]]
    params = [_greedy(40), _greedy(24)]
    base = LLM(str(windowed), dtype="float32", block_size=4, num_kv_blocks=32)
    want = [o.outputs[0].token_ids for o in base.generate(prompts, params, use_tqdm=False)]
    got_a, proposed_a = _long_proposals_after(windowed, [7 + i for i in range(12)], prompts, params)
    got_b, proposed_b = _long_proposals_after(windowed, [400 - 3 * i for i in range(12)], prompts,
                                              params)  # fmt: skip
    assert got_a == got_b == want
    assert len(proposed_a) > 2 and proposed_a == proposed_b
