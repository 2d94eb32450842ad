"""prompt_logprobs (vLLM semantics) against transformers' log_softmax over a full forward of
the prompt: whole prefill, chunked prefill, and a request sharing a cached prefix."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.core.outputs import Logprob

KV = 32 * 2**20
# 40 distinct-enough ids: several 16-token blocks, so a prefix can be cached.
PROMPT = [(7 * i + 3) % 1000 + 10 for i in range(40)]


@pytest.fixture(scope="module")
def llama(make_tiny_model: Callable[[str], Path]) -> Path:
    return make_tiny_model("LlamaForCausalLM")


@pytest.fixture(scope="module")
def reference(llama: Path) -> Callable[[list[int]], torch.Tensor]:
    """prompt ids -> [P - 1, V] logprobs of positions 0..P-2 (each scores the next token)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)[:-1]

    return run


def reference_rank(row: torch.Tensor, token: int, tol: float = 1e-4) -> range:
    """vLLM's rank, 1 + the tokens with a strictly greater logprob, computed on the
    reference row; a float tolerance widens it to the ranks within `tol` of a tie."""
    value = float(row[token])
    return range(1 + int((row > value + tol).sum()), 2 + int((row > value - tol).sum()))


def check(
    entries: list[dict[int, Logprob] | None] | None, ids: list[int], ref: torch.Tensor, k: int
):
    assert entries is not None and len(entries) == len(ids)
    assert entries[0] is None
    outside = 0
    for pos, entry in enumerate(entries[1:]):
        assert entry is not None
        token = ids[pos + 1]
        top_ids = ref[pos].topk(k).indices.tolist() if k else []
        # The prompt token and the top-k, nothing else.
        assert set(entry) == {token, *top_ids}
        for tid, value in entry.items():
            assert value.logprob == pytest.approx(float(ref[pos, tid]), abs=1e-4)
        assert [entry[t].rank for t in top_ids] == list(range(1, k + 1))
        # The prompt token's own rank, also outside the top-k.
        assert entry[token].rank in reference_rank(ref[pos], token)
        outside += entry[token].rank > k
    assert outside > 0  # the check reached tokens outside the top-k


@pytest.mark.parametrize("max_num_batched_tokens", [None, 7])
@pytest.mark.parametrize("k", [0, 3])
def test_prompt_logprobs_match_transformers(
    llama, reference, max_num_batched_tokens, k, monkeypatch
):
    """7-token budget: the 40-token prompt is prefilled in 6 chunks; whole, its 39 prompt
    rows go through the LM head in slices of 16."""
    monkeypatch.setattr("pinnace.runtime.worker.model_runner._PROMPT_ROWS_PER_SLICE", 16)
    llm = LLM(
        str(llama),
        dtype="float32",
        kv_cache_memory=KV,
        max_num_batched_tokens=max_num_batched_tokens,
    )
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=k)
    (out,) = llm.generate([PROMPT], params)
    check(out.prompt_logprobs, PROMPT, reference(PROMPT), k)
    # Without the flag nothing is computed or returned.
    (plain,) = llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0))
    assert plain.prompt_logprobs is None
    assert plain.outputs[0].token_ids == out.outputs[0].token_ids


def test_shared_prefix_is_recomputed_for_prompt_logprobs(llama, reference):
    """The second prompt shares 32 tokens (2 blocks) with the first: a plain request hits the
    prefix cache, one asking prompt logprobs skips it and still gets every position."""
    llm = LLM(str(llama), dtype="float32", kv_cache_memory=KV, max_num_batched_tokens=10)
    other = [*PROMPT[:32], 5, 6, 7, 8, 9]
    llm.generate([PROMPT], SamplingParams(max_tokens=1))
    (plain,) = llm.generate([other], SamplingParams(max_tokens=1))
    assert plain.num_cached_tokens == 32
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2)
    (out,) = llm.generate([other], params)
    assert out.num_cached_tokens == 0
    check(out.prompt_logprobs, other, reference(other), 2)


def test_n_samples_share_one_prompt_logprobs_and_one_token_prompts(llama, reference):
    llm = LLM(str(llama), dtype="float32", kv_cache_memory=KV)
    params = SamplingParams(n=3, max_tokens=2, seed=1, prompt_logprobs=1)
    (out,) = llm.generate([PROMPT[:20]], params)
    assert len(out.outputs) == 3
    check(out.prompt_logprobs, PROMPT[:20], reference(PROMPT[:20]), 1)
    (single,) = llm.generate([PROMPT[:1]], SamplingParams(max_tokens=1, prompt_logprobs=1))
    assert single.prompt_logprobs == [None]


def test_prompt_logprobs_above_max_logprobs_is_rejected(llama):
    llm = LLM(str(llama), dtype="float32", kv_cache_memory=KV, max_logprobs=4)
    with pytest.raises(ValueError, match="prompt_logprobs=5 exceeds max_logprobs=4"):
        llm.generate([PROMPT], SamplingParams(prompt_logprobs=5))
