"""Phi-3 LongRoPE, token-exact with transformers across the switch (a tiny Phi-3 with
original_max_position_embeddings = 128). transformers picks short or long factors per
forward (long once max(position) + 1 > 128) and never re-rotates its cache, so a prompt
below 128 keeps its short rotation while the decode past 128 turns long, and a prompt
above 128 is long throughout. The engine rotates each request the same way under chunked
prefill, preemption (recomputation) and prefix caching: a long prompt never reuses the
short-rotated blocks of a shorter prompt with the same tokens."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from pinnace.runtime import LLM, SamplingParams

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

SWITCH = 128  # original_max_position_embeddings of the tiny Phi-3 (tests/conftest.py)
NEW_TOKENS = 8
KV = 16 * 2**20


@pytest.fixture(scope="module")
def phi3(
    make_tiny_model: Callable[[str], Path], hf_greedy: Callable[..., list[int]]
) -> tuple[Path, list[list[int]], list[list[int]]]:
    path = make_tiny_model("Phi3ForCausalLM")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert hf.config.rope_parameters["original_max_position_embeddings"] == SWITCH
    rng = random.Random(7)
    vocab = hf.config.vocab_size
    below = [rng.randrange(vocab) for _ in range(124)]  # its 8 decodes cross 128
    # Crosses 128; shares its first 112 tokens (7 blocks) with `below`, whose blocks hold
    # the short rotation: a long prompt must not reuse them.
    across = below[:112] + [rng.randrange(vocab) for _ in range(40)]
    longer = [rng.randrange(vocab) for _ in range(170)]
    prompts = [below, across, longer]
    return path, prompts, [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]


def _generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def test_greedy_tokens_equal_transformers_across_the_switch(
    phi3: tuple[Path, list[list[int]], list[list[int]]],
) -> None:
    path, prompts, expected = phi3
    llm = LLM(str(path), dtype="float32", kv_cache_memory=KV)
    # one at a time, the short prompt first: its blocks are cached before the long one
    assert [_generate(llm, [p])[0] for p in prompts] == expected
    hits = llm.llm_engine.stats().prefix_cache_hits
    assert _generate(llm, prompts) == expected  # again, each from its own cached blocks
    assert llm.llm_engine.stats().prefix_cache_hits > hits


def test_chunked_prefill_and_preemption_rotate_alike(
    phi3: tuple[Path, list[list[int]], list[list[int]]],
) -> None:
    path, prompts, expected = phi3
    # 32-token chunks cut the long prompts' prefill across the switch; 16 blocks of 16 for
    # ~470 tokens make the requests preempt (and recompute) each other.
    small = LLM(
        str(path), dtype="float32", max_num_batched_tokens=32, num_kv_blocks=16, max_model_len=200
    )
    assert _generate(small, prompts) == expected
    assert small.llm_engine.stats().num_preemptions > 0


def test_embedding_of_a_long_prompt_equals_transformers(
    phi3: tuple[Path, list[list[int]], list[list[int]]],
) -> None:
    path, prompts, _ = phi3
    llm = LLM(str(path), dtype="float32", kv_cache_memory=KV, runner="pooling")
    got = torch.tensor([o.outputs.embedding for o in llm.embed(prompts, "last", False)])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        states = [hf(torch.tensor([p]), output_hidden_states=True).hidden_states for p in prompts]
    want = torch.stack([s[-1][0, -1] for s in states])
    assert F.cosine_similarity(got, want).min() >= 0.9999
