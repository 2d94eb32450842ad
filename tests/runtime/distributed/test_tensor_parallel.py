"""Tensor parallelism on CPU: 2 gloo ranks give TP=1's greedy tokens, token for token.

One TP=2 engine serves the whole module (spawning a rank costs seconds here): a Llama with
one KV head (replicated on both ranks) and an odd vocabulary (the last rank's LM-head
shard is padded), float32 so sums split over ranks round like the whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pinnace.runtime import LLM, SamplingParams

PROMPTS = [
    "The quick brown fox jumps over the lazy dog and then",
    "The quick brown fox jumps over the lazy dog, so the",  # shares a cached prefix
    "In a hole in the ground there lived",
    list(range(5, 70)),  # longer than the step budget: chunked prefill
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# A small step budget (chunked prefill) and few blocks (preemption when all run at once).
ENGINE = dict(dtype="float32", max_num_batched_tokens=32, num_kv_blocks=14, block_size=8,
              max_model_len=96, enable_prefix_caching=True)  # fmt: skip


@pytest.fixture(scope="module")
def odd_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + 1,  # odd: 2 ranks get a padded shard
        hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1,  # fewer KV heads than ranks
        max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("odd_llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _generate(llm: LLM) -> list[list[int]]:
    outputs = llm.generate(PROMPTS, GREEDY)  # type: ignore[arg-type]
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def tp1(odd_llama: Path) -> LLM:
    return LLM(str(odd_llama), **ENGINE)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tp2(odd_llama: Path) -> Iterator[LLM]:
    llm = LLM(str(odd_llama), tensor_parallel_size=2, **ENGINE)  # type: ignore[arg-type]
    yield llm
    llm.llm_engine.core.shutdown()


def test_tp2_greedy_equals_tp1(tp1: LLM, tp2: LLM) -> None:
    expected = _generate(tp1)
    assert _generate(tp2) == expected
    stats = tp2.llm_engine.core.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0  # both paths ran
    assert tp2.llm_engine.core.executor.world_size == 2


def test_each_rank_holds_half_the_weights(tp1: LLM, tp2: LLM) -> None:
    full, half = tp1.llm_engine.parts.weight_bytes, tp2.llm_engine.parts.weight_bytes
    # Norms are replicated and the odd vocabulary is padded: a little over one half.
    assert 0.5 * full <= half < 0.53 * full
