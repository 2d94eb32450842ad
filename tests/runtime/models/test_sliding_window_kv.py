"""Sliding-window memory: with a window on every layer, KV blocks a request's queries can no
longer see are released while it runs, and its tokens stay transformers' tokens."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pinnace.runtime import SamplingParams
from pinnace.runtime.config import EngineConfig
from pinnace.runtime.core.kv_cache_manager import KVCacheManager
from pinnace.runtime.engine.llm_engine import LLMEngine
from pinnace.runtime.request import Request

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
NEW_TOKENS = 16


def test_release_keeps_only_the_blocks_in_the_window() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, sliding_window=8)
    request = Request("r", list(range(14)), SamplingParams())
    assert kv.allocate_slots(request, 14)  # prefill: 4 blocks, nothing computed yet
    held = kv.block_ids("r")
    request.num_computed_tokens = 14
    assert kv.allocate_slots(request, 1)  # the query at 14 sees 7..14: block 0 is unseen
    assert kv.num_released_blocks == 1 and kv.pool.num_free_blocks == 8 - 3
    assert kv.block_ids("r")[1:4] == held[1:4]  # positions keep their blocks
    kv.free(request)
    assert kv.pool.num_free_blocks == 8


def test_long_context_releases_blocks_with_the_same_outputs(
    make_tiny_model: Callable[[str], Path],
    hf_greedy: Callable[..., list[int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = make_tiny_model("MistralForCausalLM")  # window 128 on every layer
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rng = random.Random(5)
    prompts = [[rng.randrange(hf.config.vocab_size) for _ in range(300)] for _ in range(2)]
    expected = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]

    config = EngineConfig(
        model=str(path),
        dtype="float32",
        num_kv_blocks=48,
        max_model_len=400,
        max_num_batched_tokens=64,
    )
    with caplog.at_level(logging.INFO, logger="pinnace.runtime"):
        engine = LLMEngine(config)
    assert "Sliding window of 128 tokens on every layer" in caplog.text
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    kv = engine.scheduler.kv
    peak, outputs = 0, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        peak = max(peak, kv.pool.num_blocks - kv.pool.num_free_blocks)
    assert [outputs["0"], outputs["1"]] == expected
    # Without release both would hold ceil(316 / 16) = 20 blocks at the end: 40.
    assert kv.num_released_blocks > 0
    assert peak <= 2 * (-(-(128 + 64) // 16) + 1)
    assert engine.scheduler.num_preemptions == 0
