"""Greedy outputs equal transformers' token for token, across engine configurations."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.core.block_pool import hash_block

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # HF past_key_values rename

ARCHS = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]
NEW_TOKENS = 32


def _prompts(vocab: int) -> list[list[int]]:
    """8 prompts from 1 to ~300 tokens; two share a 100-token prefix (prefix-cache hits)."""
    rng = random.Random(1234)
    lengths = [1, 7, 16, 33, 64, 150, 250, 300]
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
    prompts[6][:100] = prompts[7][:100]
    return prompts


@pytest.fixture(scope="module")
def references(
    make_tiny_model: Callable[[str], Path], hf_greedy: Callable[..., list[int]]
) -> dict[str, tuple[Path, list, list]]:
    """arch -> (model folder, prompts, transformers' greedy tokens for each prompt)."""
    refs = {}
    for arch in ARCHS:
        path = make_tiny_model(arch)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        prompts = _prompts(model.config.vocab_size)
        refs[arch] = (path, prompts, [hf_greedy(model, p, NEW_TOKENS) for p in prompts])
    return refs


CONFIGS = {
    "default": {},
    "no-prefix-caching": {"enable_prefix_caching": False},
    "chunked-32": {"max_num_batched_tokens": 32},
    # 22 blocks x 16 = 352 tokens for ~1100 needed: decodes outgrow the pool and preempt
    # (Mistral too, though its blocks outside the 128-token window are released).
    "preemption": {"num_kv_blocks": 22, "max_model_len": 350},
    # Speculative decoding (4 tokens proposed per step, OracleProposer: one wrong in
    # turn at each position) under chunked prefill and preemption.
    "speculative": {
        "speculative_config": {"method": "ngram", "num_speculative_tokens": 4},
        "max_num_batched_tokens": 32,
        "num_kv_blocks": 22,
        "max_model_len": 350,
    },
    # A draft model (the target with 2 % weight noise: about half its tokens accepted), its
    # KV in the same 22 blocks, under chunked prefill and preemption.
    "draft-model": {
        "speculative_config": {"model": "<draft>", "num_speculative_tokens": 3},
        "max_num_batched_tokens": 32,
        "num_kv_blocks": 22,
        "max_model_len": 350,
    },
}
SPECULATIVE = ("speculative", "draft-model")


def _accepted_block_hashes(prompts: list[list[int]], outputs: list[list[int]]) -> set[bytes]:
    """Hashes of every full block of each prompt + its (accepted) output tokens."""
    hashes = set()
    for prompt, output in zip(prompts, outputs, strict=True):
        tokens, parent = prompt + output, None
        for start in range(0, len(tokens) - 15, 16):
            parent = hash_block(parent, tokens[start : start + 16])
            hashes.add(parent)
    return hashes


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_greedy_parity(
    arch: str,
    config: str,
    references: dict,
    oracle_proposer: type,
    make_draft_model: Callable[[str], Path],
) -> None:
    path, prompts, expected = references[arch]
    options = dict(CONFIGS[config])
    if config == "draft-model":
        options["speculative_config"] = {
            "model": str(make_draft_model(arch)),
            "num_speculative_tokens": 3,
        }
    llm = LLM(str(path), dtype="float32", kv_cache_memory=64 * 2**20, **options)
    if config == "speculative":
        continuations = {tuple(p): e for p, e in zip(prompts, expected, strict=True)}
        vocab = llm.llm_engine.vocab_size
        llm.llm_engine.runner.proposer = oracle_proposer(continuations, vocab)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out, ref in zip(prompts, outs, expected, strict=True):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == ref, f"{arch}/{config}: prompt of {len(prompt)}"
        assert out.outputs[0].finish_reason == "length"
    stats = llm.llm_engine.stats()
    if config in ("preemption", *SPECULATIVE):
        assert stats.num_preemptions > 0
    if config in SPECULATIVE:
        spec = stats.spec_decoding
        assert 0 < spec.num_accepted_tokens < spec.num_draft_tokens
        # After many rejections the prefix cache holds blocks of accepted tokens only.
        accepted = _accepted_block_hashes(prompts, expected)
        cached = llm.llm_engine.scheduler.kv.pool.cached_block_hashes()
        assert cached and cached <= accepted
    if config != "no-prefix-caching":
        # A second pass is served from the prefix cache and must still match. Last prompt
        # first: in 22 blocks only the most recently finished requests' blocks survive.
        again = llm.generate(prompts[::-1], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in again] == expected[::-1]
        assert llm.llm_engine.stats().prefix_cache_hits > stats.prefix_cache_hits
        if config in SPECULATIVE:
            assert llm.llm_engine.scheduler.kv.pool.cached_block_hashes() <= accepted
    assert llm.llm_engine.stats().kv_cache_usage == 0.0
