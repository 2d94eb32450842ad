"""The sampler's logits processors: penalties, logit_bias and bad words equal transformers'
generate token for token on a tiny Llama; presence / frequency penalties and min_p equal a
direct per-row computation on fixed logits; sampled distributions pass a chi-square test."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.worker.sampler import Sampler, SamplingRow, _top_k_top_p

CPU = torch.device("cpu")
EOS = 2


def chi_square_p(counts: Counter[int], probs: dict[int, float], n: int) -> float:
    """p-value of observed counts against expected probabilities (Pearson, via torch's
    regularized upper incomplete gamma: the chi-square survival function)."""
    observed = torch.tensor([counts.get(t, 0) for t in probs], dtype=torch.float64)
    expected = torch.tensor(list(probs.values()), dtype=torch.float64) * n
    stat = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor((len(probs) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, stat / 2))


def sample_counts(logits: torch.Tensor, params: SamplingParams, n: int) -> Counter[int]:
    sampler = Sampler([EOS], seed=0, device=CPU)
    rows = [SamplingRow(f"r{i}", params, 1) for i in range(n)]
    tokens, _ = sampler(logits.repeat(n, 1), rows)
    return Counter(t for (t,) in tokens)  # one token per row (no proposals)


LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def reference_probs(params: SamplingParams) -> dict[int, float]:
    """The distribution each setting should sample from, computed the long way."""
    probs = torch.softmax(LOGITS.double() / params.temperature, -1)
    keep = set(range(len(LOGITS)))
    if params.min_p > 0:
        keep &= {t for t in keep if probs[t] >= params.min_p * probs.max()}
    order = sorted(keep, key=lambda t: -float(probs[t]))
    if params.top_k:
        order = order[: params.top_k]
    if params.top_p < 1.0:
        total = sum(float(probs[t]) for t in order)
        kept, mass = [], 0.0
        for t in order:
            if mass >= params.top_p * total:
                break
            kept.append(t)
            mass += float(probs[t])
        order = kept
    total = sum(float(probs[t]) for t in order)
    return {t: float(probs[t]) / total for t in order}


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3),
        SamplingParams(top_k=3),
        SamplingParams(top_p=0.8),
        SamplingParams(min_p=0.2),
        SamplingParams(temperature=1.5, min_p=0.1, top_k=5),
    ],
    ids=["t0.7", "t1.3", "top_k3", "top_p0.8", "min_p0.2", "t1.5+min_p+top_k"],
)
def test_sampled_distribution_passes_chi_square(params: SamplingParams) -> None:
    n = 6000
    expected = reference_probs(params)
    counts = sample_counts(LOGITS, params, n)
    assert set(counts) <= set(expected)  # nothing outside the kept set, ever
    assert chi_square_p(counts, expected, n) > 1e-3
    # The test can fail: the same counts against the untruncated softmax are rejected.
    untruncated = reference_probs(SamplingParams())
    assert chi_square_p(counts, untruncated, n) < 1e-6


def test_presence_frequency_repetition_equal_a_per_row_reference() -> None:
    torch.manual_seed(3)
    vocab = 30
    logits = torch.randn(4, vocab) * 2
    settings = [
        dict(presence_penalty=0.5, frequency_penalty=0.3),
        dict(presence_penalty=-0.4, frequency_penalty=1.1, repetition_penalty=1.4),
        dict(repetition_penalty=0.7),
        dict(),  # untouched
    ]
    prompts = [[1, 2, 3], [4, 5, 5], [6, 7], [8]]
    outputs = [[3, 3, 9, 10, 3], [5, 11, 11], [12, 6], [13]]
    rows = [
        SamplingRow(f"r{i}", SamplingParams(**s), len(o), p, o)
        for i, (s, p, o) in enumerate(zip(settings, prompts, outputs, strict=True))
    ]
    got = Sampler([EOS], 0, CPU).process(logits, rows)
    expected = logits.clone()
    for i, row in enumerate(rows):
        params = row.params
        counts = Counter(row.output_token_ids)
        for t in range(vocab):
            value = float(logits[i, t])
            if t in counts or t in row.prompt_token_ids:
                rp = params.repetition_penalty
                value = value / rp if value > 0 else value * rp
            value -= params.frequency_penalty * counts[t]
            value -= params.presence_penalty * (1.0 if counts[t] else 0.0)
            expected[i, t] = value
    torch.testing.assert_close(got, expected)
    assert not torch.equal(got[:3], logits[:3])


def test_min_p_keeps_exactly_the_tokens_above_the_scaled_top_probability() -> None:
    torch.manual_seed(4)
    logits = torch.randn(3, 50)
    min_ps = [0.05, 0.3, 0.0]
    n = 400
    for i, min_p in enumerate(min_ps):
        probs = torch.softmax(logits[i] / 0.8, -1)
        allowed = {t for t in range(50) if probs[t] >= min_p * probs.max()}
        counts = sample_counts(logits[i], SamplingParams(temperature=0.8, min_p=min_p), n)
        assert set(counts) <= allowed
        if min_p:
            assert len(allowed) < 50


def test_logit_bias_allowed_token_ids_and_bad_words_mask_the_right_tokens() -> None:
    logits = torch.zeros(3, 12)
    biased = SamplingParams(logit_bias={4: 5.0, 7: -100.0})
    allowed = SamplingParams(allowed_token_ids=[1, 9])
    bad = SamplingParams()
    bad.bad_words_token_ids = [[3], [5, 6]]
    rows = [
        SamplingRow("a", biased, 0),
        SamplingRow("b", allowed, 0),
        SamplingRow("c", bad, 2, [0, 1], [2, 5]),  # the text ends in 5: 6 completes a bad word
    ]
    out = Sampler([EOS], 0, CPU).process(logits, rows)
    assert out[0, 4] == 5.0 and out[0, 7] == -100.0 and out[0, 0] == 0.0
    assert set(torch.nonzero(torch.isfinite(out[1])).flatten().tolist()) == {1, 9}
    assert torch.isinf(out[2, [3, 6]]).all() and torch.isfinite(out[2, 5])
    rows[2] = SamplingRow("c", bad, 2, [0, 1], [5, 2])  # 5 is no longer last: 6 is fine
    assert torch.isfinite(Sampler([EOS], 0, CPU).process(logits, rows)[2, 6])


def test_a_step_with_no_processor_leaves_logits_unchanged() -> None:
    logits = torch.randn(2, 20)
    rows = [
        SamplingRow("a", SamplingParams(), 3, [1, 2], [3, 4, 5]),
        SamplingRow("b", SamplingParams(), 0),
    ]
    assert torch.equal(Sampler([EOS], 0, CPU).process(logits, rows), logits)
    assert _top_k_top_p(logits, [0, 0], [1.0, 1.0]) is logits


# -- end to end against transformers' generate ---------------------------------------------


@pytest.fixture(scope="module")
def tiny(make_tiny_model: Callable[[str], Path]) -> tuple[LLM, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    path = make_tiny_model("LlamaForCausalLM")
    llm = LLM(str(path), dtype="float32", kv_cache_memory=32 * 2**20)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return llm, hf


PROMPTS = ["The quick brown fox", "1, 2, 3,", "def fibonacci(n):"]


def hf_generate(hf: torch.nn.Module, prompt: list[int], num: int, **kwargs: object) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=num,
            min_new_tokens=num,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )
    return out[0, len(prompt) :].tolist()


def test_greedy_with_penalty_bias_and_bad_words_equals_transformers_generate(tiny) -> None:
    llm, hf = tiny
    tokenizer = llm.get_tokenizer()
    num = 24
    plain = llm.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=num, ignore_eos=True), use_tqdm=False
    )
    for prompt, out in zip(PROMPTS, plain, strict=True):
        first = out.outputs[0].token_ids
        # Ban a word the plain continuation used, and bias against its most frequent token.
        word = tokenizer.decode(first[1:2]).strip() or "the"
        common = Counter(first).most_common(1)[0][0]
        params = SamplingParams(
            temperature=0,
            max_tokens=num,
            min_tokens=num,
            ignore_eos=True,
            repetition_penalty=1.3,
            bad_words=[word, "hello world"],
            logit_bias={common: -2.5, 42: 1.5},
        )
        got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
        expected = hf_generate(
            hf,
            out.prompt_token_ids,
            num,
            repetition_penalty=1.3,
            bad_words_ids=params.bad_words_token_ids,
            sequence_bias={(common,): -2.5, (42,): 1.5},
        )
        assert got == expected
        assert got != first  # the processors changed the continuation


def test_best_of_returns_the_n_samples_of_highest_cumulative_logprob(tiny) -> None:
    llm, _ = tiny
    common = dict(temperature=1.0, seed=11, max_tokens=6, ignore_eos=True)
    every = llm.generate(PROMPTS[:1], SamplingParams(n=4, logprobs=0, **common), use_tqdm=False)
    samples = every[0].outputs
    assert len({tuple(s.token_ids) for s in samples}) == 4
    best = llm.generate(PROMPTS[:1], SamplingParams(n=2, best_of=4, **common), use_tqdm=False)
    ranked = sorted(samples, key=lambda s: s.cumulative_logprob or 0.0, reverse=True)
    assert [o.token_ids for o in best[0].outputs] == [s.token_ids for s in ranked[:2]]
    assert [o.index for o in best[0].outputs] == [0, 1]
    assert all(o.logprobs is None for o in best[0].outputs)
