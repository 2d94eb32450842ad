"""Beam search equals transformers' `num_beams` search on a tiny Llama, and its beams share
the prompt's KV blocks through the prefix cache.

Configurations checked token for token: no EOS (ignore_eos; transformers with no
eos_token_id), every beam running max_tokens; and an EOS the search reaches, with each of
transformers' early_stopping settings (False, its default; True; "never") and length
penalties other than 1 (BeamSearchParams.early_stopping, runtime/beam_search.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pinnace.runtime import LLM
from pinnace.runtime.beam_search import BeamSearchInstance, BeamSearchParams, BeamSearchSequence
from pinnace.runtime.sampling_params import ParameterError

WIDTH, NUM_TOKENS = 4, 8
# Each long enough for two full 16-token blocks that every beam shares.
PROMPTS = [
    "Once upon a time, in a land far away, there lived a king who had three daughters and a "
    "very old dog that slept all day by the fire, dreaming of the long summers when it still "
    "chased the geese across the meadow behind the castle walls",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)  # the "
    "slow way, computing the same values again and again, which a cache would avoid",
]


@pytest.fixture(scope="module")
def tiny(make_tiny_model: Callable[[str], Path]) -> tuple[LLM, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    path = make_tiny_model("LlamaForCausalLM")
    llm = LLM(str(path), dtype="float32", kv_cache_memory=32 * 2**20, block_size=16)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return llm, hf


def hf_beams(
    hf: torch.nn.Module,
    prompt: list[int],
    eos: int | None = None,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
) -> list[list[int]]:
    """transformers' best WIDTH beams, without the padding after an early EOS."""
    hf.generation_config.eos_token_id = eos
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([prompt]),
            num_beams=WIDTH,
            num_return_sequences=WIDTH,
            max_new_tokens=NUM_TOKENS,
            do_sample=False,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            eos_token_id=eos,
            pad_token_id=-1,  # not a token: marks the padding
        )
    rows = [row[len(prompt) :].tolist() for row in out]
    return [[t for t in row if t != -1] for row in rows]


def test_beam_search_equals_transformers_and_shares_kv_blocks(tiny) -> None:
    llm, hf = tiny
    pool = llm.llm_engine.scheduler.kv.pool
    queries, hits = pool.num_queries, pool.num_hits
    params = BeamSearchParams(beam_width=WIDTH, max_tokens=NUM_TOKENS, ignore_eos=True)
    results = llm.beam_search(PROMPTS, params)
    for prompt, result in zip(PROMPTS, results, strict=True):
        ids = llm.get_tokenizer().encode(prompt)
        got = [seq.output_tokens for seq in result.sequences]
        assert got == hf_beams(hf, ids)
        assert len({tuple(g) for g in got}) == WIDTH
        scores = [s.cum_logprob for s in result.sequences]
        assert scores == sorted(scores, reverse=True)
        assert result.sequences[0].text == llm.get_tokenizer().decode(got[0])
    # After the first step every beam found its prompt's full blocks in the cache: they
    # were shared, not recomputed (nor stored twice).
    full_block_tokens = [len(llm.get_tokenizer().encode(p)) // 16 * 16 for p in PROMPTS]
    assert min(full_block_tokens) >= 32
    shared = pool.num_hits - hits
    assert shared >= sum(full_block_tokens) * WIDTH * (NUM_TOKENS - 1)
    assert pool.num_queries - queries > shared  # the partial last block is per beam


@pytest.mark.parametrize(
    ("early_stopping", "length_penalty", "eos_wins"),
    [(False, 0.5, True), (True, 0.8, True), ("never", 0.8, True), (True, 2.0, False)],
)
def test_beam_search_with_eos_equals_transformers(
    tiny, early_stopping: bool | str, length_penalty: float, eos_wins: bool
) -> None:
    llm, hf = tiny
    engine = llm.llm_engine
    ids = llm.get_tokenizer().encode(PROMPTS[0])
    # The EOS: the best beam's second token, so the search reaches it at step 2; with
    # length_penalty < 1 that short beam ranks among the best, with 2.0 longer ones win.
    eos = hf_beams(hf, ids)[0][1]
    saved, engine.eos_token_ids = engine.eos_token_ids, frozenset({eos})
    try:
        params = BeamSearchParams(
            WIDTH, NUM_TOKENS, length_penalty=length_penalty, early_stopping=early_stopping
        )
        (result,) = llm.beam_search([PROMPTS[0]], params)
    finally:
        engine.eos_token_ids = saved
    got = [seq.output_tokens for seq in result.sequences]
    assert got == hf_beams(hf, ids, eos, length_penalty, early_stopping)
    ended = [seq for seq in result.sequences if seq.is_finished]
    assert all(seq.output_tokens[-1] == eos for seq in ended)
    assert bool(ended) == eos_wins == any(len(g) < NUM_TOKENS for g in got)


def test_a_beam_width_past_max_logprobs_is_refused_by_name(tiny) -> None:
    """Each step asks 2 x beam_width logprobs (with one EOS or none): past max_logprobs=20
    the error names beam_width (the user's), before any step runs, not logprobs."""
    llm, _ = tiny
    wide = BeamSearchParams(beam_width=11, max_tokens=2)
    with pytest.raises(ParameterError, match=r"beam_width=11 .* use beam_width <= 10") as info:
        llm.beam_search([PROMPTS[0]], wide)
    assert info.value.param == "beam_width"
    (result,) = llm.beam_search([PROMPTS[0]], BeamSearchParams(beam_width=10, max_tokens=2))
    assert len(result.sequences) == 10


def test_an_eos_beam_retires_and_ranks_by_length_normalized_score() -> None:
    params = BeamSearchParams(beam_width=2, max_tokens=4, length_penalty=1.0)
    inst = BeamSearchInstance([BeamSearchSequence([1, 2], 2)])
    eos = frozenset({0})
    inst.step([{0: -0.1, 5: -0.5, 6: -0.7, 9: -3.0}], params, eos)
    assert [b.output_tokens for b in inst.completed] == [[0]]
    assert [b.output_tokens for b in inst.beams] == [[5], [6]]
    inst.step([{7: -0.2, 0: -0.1}, {8: -0.1, 1: -2.0}], params, eos)
    # [5, 0] finished too: two finished, and the best live beam ([5, 7], -0.7 / 2) cannot
    # beat the worst ([5, 0], -0.6 / 2): transformers' early_stopping=False stops here.
    assert inst.beams == []
    best = inst.result(params).sequences
    # [0] scores -0.1 / 1; [5, 0] -0.6 / 2 = -0.3: the short EOS beam wins.
    assert [s.output_tokens for s in best] == [[0], [5, 0]]
    assert all(s.is_finished for s in best)
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=1)
    with pytest.raises(ValueError, match="early_stopping"):
        BeamSearchParams(beam_width=1, max_tokens=1, early_stopping="sometimes")  # type: ignore[arg-type]
