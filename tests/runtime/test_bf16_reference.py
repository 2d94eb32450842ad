"""The default path against independent references: bfloat16 with the native RMSNorm and
paged-decode kernels and oneDNN-packed linears (the native bf16 GEMV for decode rows),
against transformers' own bfloat16 and a float64 evaluation of the same bf16-rounded weights.

Two bf16 implementations cannot agree bit for bit (different op order, fused kernels), so
the checks are:

- tokens: the engine's greedy tokens, teacher-forced through transformers' bf16 model on
  the engine's own sequence (one divergence does not hide the rest), equal transformers'
  argmax at every position except genuine near-ties, where transformers' margin between its
  top token and the engine's is at most NEAR_TIE_ULPS bf16 ulps of its top logit;
- accuracy: the engine's log-probabilities of its top-k tokens are, on average, no further
  from float64's than MAX_ERROR_RATIO x transformers' bf16 ones. A kernel that rounds
  wrong or packs weights wrong moves this ratio; test_a_one_ulp_error_fails_the_check
  shows a one-ulp-per-element error in the RMSNorm kernel or in the packed linears does.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.kernels.bf16_gemv import bf16_gemv
from pinnace.runtime.kernels.paged_attention import paged_decode_attention
from pinnace.runtime.kernels.rms_norm import rms_norm
from pinnace.runtime.layers.linear import PackedLinear, can_pack

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

NEAR_TIE_ULPS = 2.0
MAX_ERROR_RATIO = 1.2
TOP_K = 5
TINY_ARCHS = ["LlamaForCausalLM", "Qwen3ForCausalLM"]


def bf16_ulp(x: float) -> float:
    """The spacing of bfloat16 numbers at |x| (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7) if x else 2.0**-133


@dataclass
class Agreement:
    num_tokens: int = 0
    near_ties: list[float] = field(default_factory=list)  # margins in ulps
    mismatches: list[str] = field(default_factory=list)  # beyond the near-tie bound
    engine_errors: list[float] = field(default_factory=list)
    hf_errors: list[float] = field(default_factory=list)

    @property
    def error_ratio(self) -> float:
        return statistics.fmean(self.engine_errors) / statistics.fmean(self.hf_errors)

    def failures(self) -> list[str]:
        found = list(self.mismatches)
        if self.error_ratio > MAX_ERROR_RATIO:
            found.append(f"log-prob error {self.error_ratio:.3f}x transformers' bf16")
        return found

    def summary(self) -> str:
        return (
            f"{self.num_tokens} tokens, {len(self.near_ties)} near-tie mismatches "
            f"(margins {sorted(round(m, 2) for m in self.near_ties)} ulps), "
            f"{len(self.mismatches)} others; log-prob error vs float64: engine "
            f"{statistics.fmean(self.engine_errors):.4f}, transformers bf16 "
            f"{statistics.fmean(self.hf_errors):.4f} (ratio {self.error_ratio:.3f})"
        )


def logits_at(model: torch.nn.Module, seq: list[int], start: int) -> torch.Tensor:
    """Logits predicting seq[start:], one row per position, in the model's dtype."""
    with torch.inference_mode():
        return model(torch.tensor([seq])).logits[0, start - 1 : -1]


def agreement(
    llm: LLM, prompts: list[list[int]], num_tokens: int, hf16: Any, hf64: Any
) -> Agreement:
    params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True, logprobs=TOP_K)
    found = Agreement()
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False), strict=True):
        tokens, start = out.outputs[0].token_ids, len(prompt)
        logits16 = logits_at(hf16, prompt + tokens, start).float()
        lp16 = logits16.log_softmax(-1)
        lp64 = logits_at(hf64, prompt + tokens, start).log_softmax(-1)
        for i, token in enumerate(tokens):
            found.num_tokens += 1
            best = int(logits16[i].argmax())
            if best != token:
                top = float(logits16[i, best])
                margin = (top - float(logits16[i, token])) / bf16_ulp(top)
                if margin <= NEAR_TIE_ULPS:
                    found.near_ties.append(margin)
                else:
                    found.mismatches.append(
                        f"prompt of {start}, token {i}: {token} where transformers has "
                        f"{best} ahead by {margin:.1f} ulps"
                    )
            for tid, lp in (out.outputs[0].logprobs or [])[i].items():
                found.engine_errors.append(abs(lp - float(lp64[i, tid])))
                found.hf_errors.append(abs(float(lp16[i, tid]) - float(lp64[i, tid])))
    return found


def random_prompts(vocab: int, lengths: list[int], seed: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def assert_default_path(llm: LLM) -> None:
    """The engine runs what users get: packed linears, with the native GEMV for decode rows
    exactly where this CPU and compiler can run it (packing needs only oneDNN bf16, the
    GEMV also avx512_bf16), and the native norm and attention kernels."""
    model = llm.llm_engine.runner.model
    assert can_pack(torch.device("cpu"), torch.bfloat16)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    gemv_here = bf16_gemv() is not None
    assert packed and all((m.gemv is not None) == gemv_here for m in packed)
    assert rms_norm() is not None and paged_decode_attention() is not None


@pytest.fixture(scope="module")
def tiny_references(make_tiny_model: Callable[[str], Path]) -> dict[str, tuple[Path, Any, Any]]:
    """arch -> (folder, transformers in bf16, the same bf16 weights evaluated in float64)."""
    refs = {}
    for arch in TINY_ARCHS:
        path = make_tiny_model(arch)
        hf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        hf64 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        refs[arch] = (path, hf16, hf64.to(torch.float64).eval())
    return refs


def tiny_agreement(refs: tuple[Path, Any, Any]) -> Agreement:
    path, hf16, hf64 = refs
    llm = LLM(str(path), dtype="bfloat16", kv_cache_memory=32 * 2**20)
    assert_default_path(llm)
    prompts = random_prompts(hf16.config.vocab_size, [1, 9, 33, 70, 150])
    return agreement(llm, prompts, 24, hf16, hf64)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_models_match_transformers_bf16(arch: str, tiny_references: dict) -> None:
    found = tiny_agreement(tiny_references[arch])
    print(f"{arch}: {found.summary()}")
    assert not found.failures(), found.summary()
    assert len(found.near_ties) <= found.num_tokens // 10, found.summary()


@pytest.fixture
def injected(monkeypatch: pytest.MonkeyPatch, fresh_kernels: None) -> Iterator[Callable]:
    """inject(part): make `part`'s bf16 output one ulp larger in magnitude, every element."""

    def ulp_up(y: torch.Tensor) -> torch.Tensor:
        return (y.view(torch.int16) + 1).view(torch.bfloat16)  # sign-magnitude: away from 0

    def inject(part: str) -> None:
        if part == "rms_norm":
            import pinnace.runtime.layers.norm as norm

            real = rms_norm()
            assert real is not None
            monkeypatch.setattr(norm, "rms_norm", lambda: lambda *a: ulp_up(real(*a)))
        else:
            real_forward = PackedLinear.forward
            monkeypatch.setattr(PackedLinear, "forward", lambda s, x: ulp_up(real_forward(s, x)))

    yield inject


@pytest.mark.parametrize("part", ["rms_norm", "packed_linear"])
def test_a_one_ulp_error_fails_the_check(part: str, injected: Callable, tiny_references: dict):
    injected(part)
    found = tiny_agreement(tiny_references["LlamaForCausalLM"])
    print(f"{part} +1 ulp: {found.summary()}")
    assert found.failures(), found.summary()


# The real model: the GGUF users serve by default, in bfloat16 as `pinnace serve` runs it.
PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:",
    "def fibonacci(n):",
    "Kubernetes schedules pods onto nodes, and",
]


def test_smollm2_matches_transformers_bf16(smollm2_gguf: str, hf_smollm2_bf16: Any) -> None:
    llm = LLM(smollm2_gguf, dtype="bfloat16", kv_cache_memory=64 * 2**20, max_model_len=512)
    assert_default_path(llm)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(p) for p in PROMPTS]
    hf64 = AutoModelForCausalLM.from_config(hf_smollm2_bf16.config, dtype=torch.float64)
    hf64.load_state_dict({k: v.double() for k, v in hf_smollm2_bf16.state_dict().items()})
    found = agreement(llm, prompts, 24, hf_smollm2_bf16, hf64.eval())
    print(f"SmolLM2-135M: {found.summary()}")
    assert not found.failures(), found.summary()
    assert len(found.near_ties) <= found.num_tokens // 10, found.summary()
