"""Beam search equals transformers' `num_beams` search on a tiny Llama, and its beams share
the prompt's KV blocks through the prefix cache.

Documented configuration: no EOS (ignore_eos here; transformers with no eos_token_id), so
every beam runs max_tokens and length_penalty=1.0 ranks by cumulative logprob, as
transformers does with early_stopping=False."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pinnace.runtime import LLM
from pinnace.runtime.beam_search import BeamSearchInstance, BeamSearchParams, BeamSearchSequence

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


def hf_beams(hf: torch.nn.Module, prompt: list[int]) -> list[list[int]]:
    hf.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([prompt]),
            num_beams=WIDTH,
            num_return_sequences=WIDTH,
            max_new_tokens=NUM_TOKENS,
            do_sample=False,
            length_penalty=1.0,
            early_stopping=False,
            pad_token_id=0,
        )
    return [row[len(prompt) :].tolist() for row in out]


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


def test_an_eos_beam_retires_and_ranks_by_length_normalized_score() -> None:
    params = BeamSearchParams(beam_width=2, max_tokens=4, length_penalty=1.0)
    inst = BeamSearchInstance([BeamSearchSequence([1, 2], 2)])
    eos = frozenset({0})
    inst.step([{0: -0.1, 5: -0.5, 6: -0.7}], params, eos)
    assert [b.output_tokens for b in inst.completed] == [[0]]
    assert [b.output_tokens for b in inst.beams] == [[5], [6]]
    inst.step([{7: -0.1}, {8: -0.1}], params, eos)
    best = inst.result(params).sequences
    # [0] scores -0.1 / 1; [5, 7] -0.6 / 2 = -0.3: the short EOS beam wins.
    assert [s.output_tokens for s in best] == [[0], [5, 7]]
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=1)
