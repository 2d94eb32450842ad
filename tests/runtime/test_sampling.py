"""Sampling: the Sampler on synthetic logits, and seeded / top-k / top-p generation
end to end on a tiny random-weight Llama with SmolLM2's real tokenizer."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.worker.sampler import Sampler, SamplingRow, _top_k_top_p, row_argmax

CPU = torch.device("cpu")
EOS = 2


class OneTokenSampler(Sampler):
    """The sampler on rows without proposals: one token (and Logprobs) per row, unwrapped."""

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> Any:
        tokens, logprobs = super().__call__(logits, rows)
        return [t for (t,) in tokens], [None if lp is None else lp[0] for lp in logprobs]


def rows(*params: SamplingParams, num_output_tokens: int = 0) -> list[SamplingRow]:
    return [SamplingRow(f"r{i}", p, num_output_tokens) for i, p in enumerate(params)]


def kept(masked: torch.Tensor) -> list[set[int]]:
    """Token ids that survived masking, per row."""
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in masked]


def log_probs(*probs: float) -> torch.Tensor:
    return torch.tensor(probs).log()


# -- top-k / top-p masks ----------------------------------------------------------------


def test_top_k_keeps_exactly_the_k_largest_logits_per_row():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5, 2.5], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    masked = _top_k_top_p(logits.repeat(2, 1), [3, 1, 0, 6], [1.0] * 4)
    assert kept(masked) == [{1, 3, 5}, {0}, set(range(6)), set(range(6))]
    assert torch.equal(masked[0, [1, 3, 5]], logits[0, [1, 3, 5]])  # survivors unchanged


@pytest.mark.parametrize(
    ("top_p", "expected"), [(0.45, {2}), (0.6, {2, 0}), (0.9, {2, 0, 3}), (1.0, {0, 1, 2, 3})]
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    logits = log_probs(0.3, 0.05, 0.5, 0.15)[None]
    assert kept(_top_k_top_p(logits, [0], [top_p])) == [expected]


def test_top_p_applies_to_the_top_k_renormalized_distribution():
    logits = log_probs(0.4, 0.3, 0.2, 0.1)[None]
    assert kept(_top_k_top_p(logits, [0], [0.5])) == [{0, 1}]
    # Within the top 2 the first token alone has 0.4 / 0.7 > 0.5 of the mass.
    assert kept(_top_k_top_p(logits, [2], [0.5])) == [{0}]


def test_sampling_only_ever_picks_tokens_inside_top_k_and_top_p():
    torch.manual_seed(0)
    logits = torch.randn(12) * 0.5  # fairly flat: every token is likely without a cut
    n = 3000
    sampler = OneTokenSampler([EOS], seed=0, device=CPU)
    top3 = set(logits.topk(3).indices.tolist())
    tokens, _ = sampler(logits.repeat(n, 1), rows(*[SamplingParams(top_k=3)] * n))
    assert set(tokens) == top3
    # Frequencies follow the renormalized top-3 probabilities.
    probs = torch.softmax(logits[sorted(top3)], dim=-1)
    counts = Counter(tokens)
    for token, p in zip(sorted(top3), probs.tolist(), strict=True):
        assert abs(counts[token] / n - p) < 0.05
    nucleus = kept(_top_k_top_p(logits[None], [0], [0.5]))[0]
    assert 1 < len(nucleus) < 12
    tokens, _ = sampler(logits.repeat(n, 1), rows(*[SamplingParams(top_p=0.5)] * n))
    assert set(tokens) == nucleus


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampled_frequencies_follow_the_temperature_scaled_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 4000
    sampler = OneTokenSampler([EOS], seed=0, device=CPU)
    tokens, _ = sampler(logits.repeat(n, 1), rows(*[SamplingParams(temperature=temperature)] * n))
    counts = Counter(tokens)
    for token, p in enumerate(torch.softmax(logits / temperature, dim=-1).tolist()):
        assert abs(counts[token] / n - p) < 0.03


# -- greedy, logprobs, min_tokens ----------------------------------------------------------


def test_greedy_rows_take_the_argmax_even_in_a_sampled_batch():
    torch.manual_seed(1)
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5)] * 3
    tokens, _ = OneTokenSampler([EOS], seed=0, device=CPU)(logits, rows(*params))
    argmax = logits.argmax(dim=-1).tolist()
    assert tokens[0::2] == argmax[0::2]


def test_logprobs_match_log_softmax_of_the_raw_logits():
    torch.manual_seed(2)
    logits = torch.randn(3, 40)
    params = [
        SamplingParams(temperature=0.5, logprobs=3),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=0.0),
    ]
    tokens, logprobs = OneTokenSampler([EOS], seed=0, device=CPU)(logits, rows(*params))
    expected = torch.log_softmax(logits, dim=-1)
    first, second, third = logprobs
    assert first is not None and second is not None and third is None
    assert math.isclose(first.token_logprob, expected[0, tokens[0]].item(), rel_tol=1e-6)
    values, ids = expected[0].topk(3)
    assert list(first.top) == ids.tolist()
    assert list(first.top.values()) == pytest.approx(values.tolist(), rel=1e-6)
    assert second.top == {}
    assert second.token_logprob == pytest.approx(expected[1].max().item(), rel=1e-6)


def test_min_tokens_bans_eos_and_stop_tokens_until_reached():
    logits = torch.zeros(2, 10)
    logits[:, EOS], logits[:, 5], logits[:, 7] = 9.0, 8.0, 7.0
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[5], logprobs=0)
    sampler = OneTokenSampler([EOS], seed=0, device=CPU)
    early = [SamplingRow("a", params, 1), SamplingRow("b", SamplingParams(temperature=0.0), 1)]
    tokens, logprobs = sampler(logits.clone(), early)  # the sampler consumes its logits
    assert tokens == [7, EOS]  # only the row still under min_tokens is affected
    assert logprobs[0] is not None and math.isfinite(logprobs[0].token_logprob)
    tokens, _ = sampler(logits[:1], [SamplingRow("a", params, 2)])
    assert tokens == [EOS]
    n = 500
    flat = torch.zeros(n, 10)
    sampled = SamplingParams(min_tokens=1, stop_token_ids=[5])
    tokens, _ = sampler(flat, [SamplingRow(f"s{i}", sampled, 0) for i in range(n)])
    assert EOS not in tokens and 5 not in tokens and len(set(tokens)) == 8


# -- seeds -----------------------------------------------------------------------------------


def run_steps(sampler: Sampler, batches: list[list[SamplingRow]], vocab: int) -> dict[str, list]:
    """Sample every batch in turn; each step's logits are a fixed function of the step."""
    out: dict[str, list[int]] = {}
    for step, batch in enumerate(batches):
        gen = torch.Generator().manual_seed(step)
        logits = torch.randn(vocab, generator=gen).repeat(len(batch), 1)
        tokens, _ = sampler(logits, batch)
        for row, token in zip(batch, tokens, strict=True):
            out.setdefault(row.req_id, []).append(token)
    return out


def solo(params: SamplingParams, steps: int = 6) -> list[list[SamplingRow]]:
    return [[SamplingRow("x", params, i)] for i in range(steps)]


def test_seeded_rows_do_not_depend_on_the_batch():
    vocab = 500
    seeded = SamplingParams(temperature=1.0, seed=42)
    alone = run_steps(OneTokenSampler([EOS], 0, CPU), solo(seeded), vocab)
    others = [
        SamplingRow("u", SamplingParams(temperature=0.8), 0),
        SamplingRow("g", SamplingParams(temperature=0.0), 0),
        SamplingRow("s", SamplingParams(temperature=1.3, seed=7), 0),
    ]
    # Row "x" moves through the batch; the global generator is seeded differently.
    batches = [[*others[: i % 4], SamplingRow("x", seeded, i), *others[i % 4 :]] for i in range(6)]
    mixed = run_steps(OneTokenSampler([EOS], 123, CPU), batches, vocab)
    assert mixed["x"] == alone["x"]
    assert len(set(alone["x"])) > 1  # the seed drives a real random sequence
    other_seed = SamplingParams(temperature=1.0, seed=43)
    assert run_steps(OneTokenSampler([EOS], 0, CPU), solo(other_seed), vocab)["x"] != alone["x"]


def test_dropping_a_request_resets_its_generator():
    sampler = OneTokenSampler([EOS], 0, CPU)
    seeded = SamplingParams(seed=5)
    first = run_steps(sampler, solo(seeded, 4), 300)
    sampler.drop({"x"})
    assert run_steps(sampler, solo(seeded, 4), 300) == first


def test_unseeded_sampling_varies_between_calls():
    sampler = OneTokenSampler([EOS], 0, CPU)
    logits = torch.zeros(1, 1000)
    draws = [sampler(logits, rows(SamplingParams()))[0][0] for _ in range(20)]
    assert len(set(draws)) > 10


# -- end to end on a tiny model -------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(make_tiny_model: Callable[[str], Path]) -> LLM:
    path = make_tiny_model("LlamaForCausalLM")
    return LLM(str(path), dtype="float32", kv_cache_memory=32 * 2**20)


PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away, there lived",
    "1, 2, 3,",
    "def fibonacci(n):",
]


def token_ids(outputs) -> list[list[int]]:
    return [c.token_ids for out in outputs for c in out.outputs]


def test_same_seed_same_text_alone_or_in_a_batch_of_16(llm):
    target = SamplingParams(temperature=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    prompt = "Tell me a story about a dragon"
    alone = llm.generate([prompt], target, use_tqdm=False)[0].outputs[0]
    others, other_params = [], []
    for i in range(16):
        others.append(PROMPTS[i % 4] + " and more" * (i % 5))
        seed = 1000 + i if i % 2 == 0 else None  # mixed seeded / unseeded
        temperature = [0.0, 0.5, 1.0, 1.5][i % 4]
        other_params.append(SamplingParams(temperature=temperature, seed=seed, max_tokens=4 + i))
    batch = [*others[:7], prompt, *others[7:]]
    params = [*other_params[:7], target, *other_params[7:]]
    together = llm.generate(batch, params, use_tqdm=False)[7].outputs[0]
    assert together.token_ids == alone.token_ids and together.text == alone.text
    assert len(alone.token_ids) == 12
    # The seed matters: another seed gives another continuation.
    reseeded = replace(target, seed=99)
    other = llm.generate([prompt], reseeded, use_tqdm=False)[0].outputs[0]
    assert other.token_ids != alone.token_ids


def test_top_k_1_and_tiny_top_p_equal_greedy(llm):
    common = dict(max_tokens=8, ignore_eos=True)
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0.0, **common), use_tqdm=False)
    top_k = llm.generate(
        PROMPTS, SamplingParams(temperature=1.0, top_k=1, **common), use_tqdm=False
    )
    top_p = llm.generate(
        PROMPTS, SamplingParams(temperature=1.0, top_p=1e-6, **common), use_tqdm=False
    )
    assert token_ids(top_k) == token_ids(greedy) == token_ids(top_p)


def test_temperature_without_seed_varies_across_runs(llm):
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    runs = [token_ids(llm.generate(PROMPTS[:1], params, use_tqdm=False))[0] for _ in range(3)]
    assert len({tuple(r) for r in runs}) == 3
    # n samples of one prompt differ too, while a seed makes the n samples reproducible.
    seeded = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)
    first = token_ids(llm.generate(PROMPTS[:1], seeded, use_tqdm=False))
    second = token_ids(llm.generate(PROMPTS[:1], seeded, use_tqdm=False))
    assert first == second and len({tuple(s) for s in first}) == 3


def test_seeded_text_survives_preemption(llm, make_tiny_model):
    # 4 blocks of 16 tokens for 6 requests growing to ~20 tokens: requests are preempted
    # and recomputed, yet each seeded request gives the tokens it gives with room to spare.
    params = [
        SamplingParams(temperature=1.0, seed=100 + i, max_tokens=12, ignore_eos=True)
        for i in range(6)
    ]
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(6)]
    small = LLM(str(make_tiny_model("LlamaForCausalLM")), dtype="float32", num_kv_blocks=4)
    crowded = small.generate(prompts, params, use_tqdm=False)
    assert small.llm_engine.stats().num_preemptions > 0
    roomy = llm.generate(prompts, params, use_tqdm=False)
    assert llm.llm_engine.stats().num_preemptions == 0
    assert token_ids(crowded) == token_ids(roomy)


def test_row_argmax_is_argmax_with_ties_and_nan() -> None:
    """Greedy's row_argmax (max(dim=-1).indices) picks argmax's index: the first of tied
    maxima, and a NaN's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-4, 4, (64, 300), generator=g).float()  # many ties per row
    x[3, 10] = float("nan")
    x[5, 7] = x[5, 200] = 99.0
    got = row_argmax(x)
    assert torch.equal(got, x.argmax(dim=-1))
    assert int(got[3]) == 10 and int(got[5]) == 7
    assert torch.equal(row_argmax(x.bfloat16()), x.bfloat16().argmax(dim=-1))
