"""Speculative decoding end to end on tiny random models (the greedy equality of every
architecture under chunking, preemption and prefix caching is in test_parity.py and
models/test_arch_parity.py): stops inside a proposal, the n-gram proposer, rejection
sampling's output distribution, seeds, and the configuration's errors."""

from __future__ import annotations

import random
import re
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import generate_latest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.config import EngineConfig
from pinnace.runtime.core.outputs import ScheduledRequest, SchedulerStats, SpecDecodingStats
from pinnace.runtime.distributed.model_split import check_split_support
from pinnace.runtime.engine.stat_logger import StatLogger
from pinnace.runtime.sampling_params import StructuredOutputsParams
from pinnace.runtime.server.metrics import ServingMetrics
from pinnace.runtime.spec_decode import SpeculativeConfig
from pinnace.runtime.spec_decode import rejection_sampler as rs
from pinnace.runtime.spec_decode.ngram_proposer import NgramProposer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_min": 1,
    "prompt_lookup_max": 3,
}


def _continuations(prompts: list[list[int]], outs: list) -> dict[tuple[int, ...], list[int]]:
    return {tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, outs, strict=True)}


# -- stops inside a proposal --------------------------------------------------------------


@pytest.mark.parametrize("proposer", ["oracle", "draft-model"])
def test_stops_and_max_tokens_inside_a_proposal_match_no_speculation(
    make_tiny_model: Callable[[str], Path], oracle_proposer: type, proposer: str
) -> None:
    path = str(make_tiny_model("LlamaForCausalLM"))
    base = LLM(path, dtype="float32", kv_cache_memory=4 * 2**20)
    prompts = [[1000 + 37 * i for i in range(40)]]  # 2 full blocks: prefix-cache hits
    free = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    reference = base.generate(prompts, free, use_tqdm=False)[0].outputs[0]
    # Every proposal right, so each step carries k + 1 tokens and the stops fall inside
    # one: the oracle knows the continuation; the target is its own draft.
    if proposer == "oracle":
        spec = LLM(path, dtype="float32", kv_cache_memory=4 * 2**20, speculative_config=NGRAM)
        spec.llm_engine.runner.proposer = oracle_proposer(
            {tuple(prompts[0]): reference.token_ids}, spec.llm_engine.vocab_size, errors=False
        )
    else:
        draft = {"model": path, "num_speculative_tokens": 4}
        spec = LLM(path, dtype="float32", kv_cache_memory=4 * 2**20, speculative_config=draft)
    text = reference.text
    stop_string = text[len(text) // 2 : len(text) // 2 + 3]
    cases = [
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
        SamplingParams(
            temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[reference.token_ids[7]]
        ),
        SamplingParams(
            temperature=0, max_tokens=16, ignore_eos=True, stop=[stop_string], logprobs=2
        ),
    ]
    for params in cases:
        want = base.generate(prompts, params, use_tqdm=False)[0].outputs[0]
        got = spec.generate(prompts, params, use_tqdm=False)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason) == (
            want.token_ids,
            want.text,
            want.finish_reason,
        )
        assert got.stop_reason == want.stop_reason
        assert len(got.token_ids) < 16
        if params.logprobs is not None:
            assert got.logprobs is not None and want.logprobs is not None
            assert len(got.logprobs) == len(got.token_ids)
            last = got.token_ids[-1]
            assert got.logprobs[-1][last] == pytest.approx(want.logprobs[-1][last], abs=1e-4)
    # n = 2: each sample is a request of its own with its own proposals (and draft KV).
    two = SamplingParams(n=2, temperature=0, max_tokens=11, ignore_eos=True)
    samples = spec.generate(prompts, two, use_tqdm=False)[0].outputs
    assert [s.token_ids for s in samples] == [reference.token_ids[:11]] * 2
    stats = spec.llm_engine.stats()
    # Every proposal is right (a wrong draft KV would show as a rejection here, not in the
    # tokens: verification repairs them).
    sd = stats.spec_decoding
    assert 0 < sd.num_accepted_tokens == sd.num_draft_tokens, sd
    assert stats.prefix_cache_hits > 0


# -- the n-gram proposer ------------------------------------------------------------------


def test_ngram_proposes_what_followed_the_longest_most_recent_match() -> None:
    proposer = NgramProposer(min_n=1, max_n=3, num_speculative_tokens=3)
    # "7 8 9" occurred before, followed by 1 2 3; the longer match beats "9 -> 4".
    assert proposer.propose_one([7, 8, 9, 1, 2, 3, 9, 4, 5, 7, 8, 9]) == [1, 2, 3]
    # Only a 1-gram matches: the most recent occurrence with 3 tokens after it.
    assert proposer.propose_one([5, 1, 1, 1, 6, 5, 2, 2, 2, 0, 5]) == [2, 2, 2]
    # Near the end, fewer than k tokens follow the only match.
    assert proposer.propose_one([4, 6, 4]) == [6, 4]
    assert proposer.propose_one([1, 2, 3, 4]) == []
    assert NgramProposer(2, 3, 2).propose_one([1, 2, 3, 9, 2]) == []  # 1-grams not allowed


# -- rejection sampling -------------------------------------------------------------------


def _chi_square_p(counts: list[int], probs: list[float]) -> float:
    """Goodness-of-fit p-value; cells expected below 5 are pooled into one."""
    n = sum(counts)
    cells, pooled_c, pooled_e = [], 0, 0.0
    for c, p in zip(counts, probs, strict=True):
        if n * p >= 5:
            cells.append((c, n * p))
        else:
            pooled_c, pooled_e = pooled_c + c, pooled_e + n * p
    if pooled_e > 0:
        cells.append((pooled_c, pooled_e))
    stat = sum((c - e) ** 2 / e for c, e in cells)
    df = torch.tensor((len(cells) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, torch.tensor(stat / 2, dtype=torch.float64)))


def test_rejection_verdicts_keep_the_target_distribution_with_a_draft_distribution() -> None:
    gen = torch.Generator().manual_seed(0)
    vocab, n = 8, 20000
    p = torch.softmax(torch.randn(vocab, generator=gen) * 1.5, -1)
    q = torch.softmax(torch.randn(vocab, generator=gen) * 1.5, -1)  # deliberately different
    drafts = torch.multinomial(q, n, replacement=True, generator=gen)
    # Row pairs per request: row 0 scores the draft, row 1 is the bonus row.
    probs = p.repeat(2 * n, 1)
    draft_flat = torch.stack([drafts, torch.zeros_like(drafts)], 1).flatten()
    is_draft = torch.tensor([True, False]).repeat(n)
    uniforms = torch.rand(2 * n, generator=gen)
    noise = torch.empty(2 * n, vocab).exponential_(generator=gen)
    accepted, fallback = rs.rejection_verdicts(
        probs, draft_flat, is_draft, uniforms, noise, q.repeat(2 * n, 1)
    )
    tokens = rs.emitted_tokens([[d] for d in drafts.tolist()], accepted.tolist(), fallback.tolist())
    first = Counter(t[0] for t in tokens)
    assert _chi_square_p([first[i] for i in range(vocab)], p.tolist()) > 1e-3
    # The proposer's q alone would fail the same test.
    drafted = Counter(drafts.tolist())
    assert _chi_square_p([drafted[i] for i in range(vocab)], p.tolist()) < 1e-6
    assert 0.2 < accepted.float().mean() * 2 < 0.95  # both branches taken


VOCAB = 12


@pytest.fixture(scope="module")
def tiny_vocab_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A 12-token Llama (the tokenizer's first 12 ids): outputs' distributions can be
    enumerated exactly."""
    config = AutoConfig.for_model(
        "llama",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        initializer_range=0.3,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = tmp_path_factory.mktemp("tiny-vocab")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def _exact_marginals(path: Path, prompt: list[int], steps: int, temperature: float) -> list:
    """P(token at output position j) for j < steps, by enumerating every prefix."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    seqs = torch.tensor([prompt])
    weights = torch.ones(1, dtype=torch.float64)
    marginals = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=seqs).logits[:, -1] / temperature  # [S, V]
            probs = torch.softmax(logits, -1) * weights[:, None]
            marginals.append(probs.sum(0).tolist())
            seqs = torch.cat(
                [seqs.repeat_interleave(VOCAB, 0), torch.arange(VOCAB).repeat(len(seqs))[:, None]],
                1,
            )
            weights = probs.flatten()
    return marginals


class SkewedProposer:
    """Deliberately different from the target: half the proposals are token 3 four times
    (an error in the acceptance rule shows as token 3's frequency), half are 4 tokens
    drawn uniformly."""

    def __init__(self) -> None:
        self.rng = random.Random(0)

    def propose(self, items: list[ScheduledRequest], sampled: list[list[int]]) -> list[list[int]]:
        return [
            [3] * 4 if self.rng.random() < 0.5 else [self.rng.randrange(VOCAB) for _ in range(4)]
            for _ in items
        ]


@pytest.fixture(scope="module")
def tiny_vocab_draft(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A deliberately different draft for tiny_vocab_model: another architecture (Qwen2,
    2 KV heads, its own random weights), the same 12-token vocabulary."""
    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.3,
        architectures=["Qwen2ForCausalLM"],
    )
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = tmp_path_factory.mktemp("tiny-vocab-draft")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("proposer", ["skewed", "draft-model"])
def test_sampled_outputs_follow_the_target_distribution(
    tiny_vocab_model: Path, tiny_vocab_draft: Path, proposer: str
) -> None:
    prompt, steps, temperature = [1, 4, 2], 4, 0.8
    exact = _exact_marginals(tiny_vocab_model, prompt, steps, temperature)
    spec: dict[str, object] = {"method": "ngram"}
    if proposer == "draft-model":
        spec = {"model": str(tiny_vocab_draft)}
    llm = LLM(
        str(tiny_vocab_model),
        dtype="float32",
        kv_cache_memory=32 * 2**20,
        max_num_seqs=512,
        speculative_config={
            **spec,
            "num_speculative_tokens": 4,
            "disable_by_batch_size": None,  # speculate in batches of 512 too
        },
        enable_prefix_caching=False,
    )
    if proposer == "skewed":
        llm.llm_engine.runner.proposer = SkewedProposer()
    else:  # the draft's greedy tokens are not the target's: its q is far from p
        greedy = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
        draft_greedy = LLM(str(tiny_vocab_draft), dtype="float32", kv_cache_memory=2**20)
        target_greedy = llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids
        assert (
            draft_greedy.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids
            != target_greedy
        )
    params = SamplingParams(temperature=temperature, max_tokens=steps, ignore_eos=True)
    outs = llm.generate([prompt] * 2400, params, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outs]
    for j in range(steps):
        counts = Counter(t[j] for t in tokens)
        assert _chi_square_p([counts[i] for i in range(VOCAB)], exact[j]) > 1e-3, j
    spec = llm.llm_engine.stats().spec_decoding
    assert 0 < spec.num_accepted_tokens < spec.num_draft_tokens
    assert spec.num_accepted_tokens_per_pos[1] > 0  # a second proposal accepted too


def test_seeded_requests_reproduce_with_speculation(tiny_vocab_model: Path) -> None:
    llm = LLM(
        str(tiny_vocab_model), dtype="float32", kv_cache_memory=8 * 2**20, speculative_config=NGRAM
    )
    # The n-gram proposer reads only the request's own tokens (with 12 tokens it always
    # finds a match), so a seeded request gets the same proposals in any batch.
    seeded = SamplingParams(temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    alone = llm.generate([[1, 2, 3]], seeded, use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate([[5, 6], [1, 2, 3], [7]], [other, seeded, other], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone
    assert llm.llm_engine.stats().spec_decoding.num_drafts > 0
    reseeded = SamplingParams(temperature=1.0, seed=12, max_tokens=12, ignore_eos=True)
    assert llm.generate([[1, 2, 3]], reseeded, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_ngram_greedy_equals_no_speculation(tiny_vocab_model: Path) -> None:
    # With 12 tokens every one recurs, so the real n-gram proposer proposes every step.
    kwargs = dict(dtype="float32", kv_cache_memory=4 * 2**20, max_num_batched_tokens=16)
    base = LLM(str(tiny_vocab_model), **kwargs)  # type: ignore[arg-type]
    spec = LLM(str(tiny_vocab_model), speculative_config=NGRAM, **kwargs)  # type: ignore[arg-type]
    prompts = [[1, 2, 3, 1, 2], list(range(12)) * 3, [5, 5, 5, 5, 6, 7, 5, 5]]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in base.generate(prompts, params, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)] == want
    # n > 1: each sample is a request of its own with its own proposals.
    two = SamplingParams(n=2, temperature=0, max_tokens=30, ignore_eos=True)
    outs = spec.generate(prompts[:1], two, use_tqdm=False)[0].outputs
    assert [c.token_ids for c in outs] == [want[0], want[0]]
    stats = spec.llm_engine.stats().spec_decoding
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    # No proposals in steps where more than disable_by_batch_size requests sample (here
    # only while the chunked prefills have not all finished).
    capped = LLM(
        str(tiny_vocab_model), speculative_config={**NGRAM, "disable_by_batch_size": 2}, **kwargs
    )  # type: ignore[arg-type]
    assert [
        o.outputs[0].token_ids for o in capped.generate(prompts, params, use_tqdm=False)
    ] == want
    assert capped.llm_engine.stats().spec_decoding.num_drafts < stats.num_drafts / 4


# -- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"method": "ngram"}, "needs num_speculative_tokens"),
        ({"method": "eagle", "num_speculative_tokens": 2}, "not one of ngram, draft_model"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be"),
        ({"num_speculative_tokens": 2, "prompt_lookup_max": 2}, "not one of"),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
             "prompt_lookup_max": 2},
            "prompt_lookup_min (4) must not exceed prompt_lookup_max (2)",
        ),
        ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "unknown key"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "needs a model path"),
        ({"model": "/m", "num_speculative_tokens": 2, "prompt_lookup_max": 2},
         "are for method 'ngram'"),
        ("ngram", "must be a JSON object"),
    ],
)  # fmt: skip
def test_speculative_config_errors_name_the_problem(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SpeculativeConfig.from_dict(value)  # type: ignore[arg-type]


def test_speculative_config_resolves_the_lookup_range_as_vllm() -> None:
    one_end = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 4,
                                           "prompt_lookup_max": 4})  # fmt: skip
    assert (one_end.prompt_lookup_min, one_end.prompt_lookup_max) == (4, 4)
    neither = SpeculativeConfig(num_speculative_tokens=2, method="ngram")
    assert (neither.prompt_lookup_min, neither.prompt_lookup_max) == (5, 5)
    draft = SpeculativeConfig(num_speculative_tokens=2, model="/m")  # method from the model
    assert draft.method == "draft_model"


def test_a_draft_with_another_vocabulary_or_tokenizer_is_refused(
    make_tiny_model: Callable[[str], Path],
    tiny_vocab_model: Path,
    tmp_path: Path,
) -> None:
    target = str(make_tiny_model("LlamaForCausalLM"))
    with pytest.raises(ValueError, match=r"vocabulary of 12 tokens and the target .* 49152"):
        LLM(
            target, speculative_config={"model": str(tiny_vocab_model), "num_speculative_tokens": 2}
        )
    # Same vocabulary size, another tokenizer (one token renamed).
    draft = tmp_path / "draft"
    shutil.copytree(target, draft)
    vocab_file = draft / "tokenizer.json"
    text = vocab_file.read_text().replace('"<|im_start|>"', '"<|im_begin|>"')
    vocab_file.write_text(text)
    with pytest.raises(ValueError, match="another tokenizer than the target"):
        LLM(target, speculative_config={"model": str(draft), "num_speculative_tokens": 2})


def test_speculation_is_refused_for_a_pooling_runner(
    make_tiny_model: Callable[[str], Path],
) -> None:
    with pytest.raises(ValueError, match="needs runner 'generate'"):
        LLM(str(make_tiny_model("LlamaForCausalLM")), runner="pooling", speculative_config=NGRAM)


# -- metrics and the periodic log line ----------------------------------------------------


def _stats(num_drafts: int, proposed: int, accepted: int, per_pos: list[int]) -> SchedulerStats:
    spec = SpecDecodingStats(num_drafts, proposed, accepted, per_pos)
    return SchedulerStats(2, 0, 0.5, 100, 40, 0, spec_decoding=spec)


def test_spec_decode_counters_are_exported_under_the_prefix() -> None:
    stats = _stats(10, 40, 25, [9, 8, 5, 3])
    metrics = ServingMetrics("m", lambda: stats, speculative=True)
    text = generate_latest(metrics.registry).decode()
    assert 'pinnace:spec_decode_num_drafts_total{model_name="m"} 10.0' in text
    assert 'pinnace:spec_decode_num_draft_tokens_total{model_name="m"} 40.0' in text
    assert 'pinnace:spec_decode_num_accepted_tokens_total{model_name="m"} 25.0' in text
    assert (
        'pinnace:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="2"} 5.0'
        in text
    )
    plain = generate_latest(ServingMetrics("m", lambda: stats).registry).decode()
    assert "spec_decode" not in plain


def test_log_line_reports_the_acceptance_rate_of_the_interval() -> None:
    logger = StatLogger(interval=5.0)
    logger.observe(_stats(10, 40, 25, [9, 8, 5, 3]), 50, now=logger._last_time + 5)
    line = logger.line(_stats(14, 56, 29, [12, 9, 5, 3]), 5.0)
    # Since the last line: 4 drafts, 16 proposed, 4 accepted.
    assert "acceptance rate: 25.0%" in line and "accepted 4 of 16" in line
    assert (
        "mean acceptance length: 2.00" in line and "(per position: 0.75, 0.25, 0.00, 0.00)" in line
    )
    assert "spec" not in StatLogger().line(_stats(0, 0, 0, []), 5.0).lower()


def test_a_draft_model_is_refused_under_tensor_parallelism() -> None:
    config = EngineConfig(
        "/m",
        tensor_parallel_size=2,
        speculative_config={"model": "/d", "num_speculative_tokens": 2},
    )
    ckpt = SimpleNamespace(format="safetensors", config=None)
    with pytest.raises(ValueError, match="with a speculative draft model is not supported"):
        check_split_support(config, ckpt, None)


def test_structured_outputs_are_not_speculated_and_keep_their_tokens(
    make_tiny_model: Callable[[str], Path], make_draft_model: Callable[[str], Path]
) -> None:
    """A grammar's mask would have to follow each proposal: constrained requests get none
    (the draft still reads their tokens) while others in the batch are speculated."""
    path = str(make_tiny_model("LlamaForCausalLM"))
    draft = {"model": str(make_draft_model("LlamaForCausalLM")), "num_speculative_tokens": 3}
    base = LLM(path, dtype="float32", kv_cache_memory=4 * 2**20)
    spec = LLM(path, dtype="float32", kv_cache_memory=4 * 2**20, speculative_config=draft)
    pattern = "[a-z]{3}-[0-9]{3}"
    constrained = SamplingParams(
        temperature=0, max_tokens=12, structured_outputs=StructuredOutputsParams(regex=pattern)
    )
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 6, 7], [100 + i for i in range(20)]]
    want = base.generate(prompts, [constrained, free], use_tqdm=False)
    got = spec.generate(prompts, [constrained, free], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert re.fullmatch(pattern, got[0].outputs[0].text)
    num_drafts = spec.llm_engine.stats().spec_decoding.num_drafts
    assert num_drafts > 0
    spec.generate(prompts[:1], constrained, use_tqdm=False)
    assert spec.llm_engine.stats().spec_decoding.num_drafts == num_drafts
