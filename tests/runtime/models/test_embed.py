"""LLM.embed: pooled final hidden states of a decoder equal transformers' (cosine >=
0.9999) for last-token and mean pooling, for a batch of prompts of different lengths; a
sentence-transformers folder's pooling and normalisation are the default (and its runner,
auto, is pooling). One runner per engine: generate and embed each refuse the other."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.models.registry import resolve_runner
from pinnace.runtime.worker import model_runner

PROMPTS = [[5, 17, 300, 4000, 9], list(range(100, 140)), [7]]


def _reference(path: Path, pooling: str) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            hidden = hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1][0]
            rows.append(hidden[-1] if pooling == "last" else hidden.mean(dim=0))
    return torch.stack(rows)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_embeddings_match_transformers(
    pooling: str, make_tiny_model: Callable[[str], Path]
) -> None:
    path = make_tiny_model("Qwen2ForCausalLM")
    llm = LLM(str(path), dtype="float32", kv_cache_memory=2**24, runner="pooling")
    outs = llm.embed(PROMPTS, pooling=pooling, normalize=False)
    got = torch.tensor([o.outputs.embedding for o in outs])
    want = _reference(path, pooling)
    assert got.shape == want.shape == (3, 64)
    assert F.cosine_similarity(got, want).min() >= 0.9999
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert [o.prompt_token_ids for o in outs] == PROMPTS
    normalized = torch.tensor([o.outputs.embedding for o in llm.embed(PROMPTS, pooling)])
    torch.testing.assert_close(normalized.norm(dim=-1), torch.ones(3))


def test_many_prompts_run_in_forwards_of_the_token_budget(
    make_tiny_model: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 prompts (one longer than the budget) under max_num_batched_tokens=24: the same
    vectors as one prompt at a time on a default engine, through one scratch cache sized to
    the budget or the longest prompt, never to the whole call."""
    path = make_tiny_model("Qwen2ForCausalLM")
    prompts = [[(7 * i + j) % 500 + 3 for j in range(1 + i % 9)] for i in range(40)]
    prompts[17] = list(range(200, 250))  # 50 tokens: runs alone, in three pieces
    small = LLM(str(path), dtype="float32", kv_cache_memory=2**24, runner="pooling",
                max_num_batched_tokens=24)  # fmt: skip
    reference = LLM(str(path), dtype="float32", kv_cache_memory=2**24, runner="pooling")
    allocated: list[int] = []
    real_allocate = model_runner.allocate_kv_caches

    def spy(config: Any, num_blocks: int, *args: Any) -> list[torch.Tensor]:
        allocated.append(num_blocks)
        return real_allocate(config, num_blocks, *args)

    monkeypatch.setattr(model_runner, "allocate_kv_caches", spy)
    for pooling in ("last", "mean"):
        got = torch.tensor([o.outputs.embedding for o in small.embed(prompts, pooling)])
        assert allocated == [4]  # ceil(50 / 16) blocks of 16, not the call's 49 or more
        allocated.clear()
        want = torch.tensor([reference.embed([p], pooling)[0].outputs.embedding for p in prompts])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert max(allocated) == 4  # one prompt at a time: its own blocks
        allocated.clear()


def test_sentence_transformers_pooling_is_the_default(
    make_tiny_model: Callable[[str], Path], tmp_path: Path
) -> None:
    folder = tmp_path / "st"
    shutil.copytree(make_tiny_model("Qwen2ForCausalLM"), folder)
    kinds = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    modules = [
        {"idx": i, "name": str(i), "path": p, "type": f"sentence_transformers.models.{kind}"}
        for i, (p, kind) in enumerate(kinds)
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True})
    )
    llm = LLM(str(folder), dtype="float32", kv_cache_memory=2**24)  # runner auto
    assert llm.llm_engine.runner_type == "pooling"  # picked from modules.json
    got = torch.tensor([o.outputs.embedding for o in llm.embed(PROMPTS)])
    want = F.normalize(_reference(folder, "mean"), dim=-1)
    assert F.cosine_similarity(got, want).min() >= 0.9999
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))
    single = llm.embed("hello there")  # one prompt, as text
    assert len(single) == 1 and len(single[0].outputs.embedding) == 64


def test_one_runner_per_engine(make_tiny_model: Callable[[str], Path]) -> None:
    path = str(make_tiny_model("Qwen2ForCausalLM"))
    params = SamplingParams(max_tokens=2)
    generating = LLM(path, dtype="float32", kv_cache_memory=2**24)  # auto: a causal LM
    assert generating.llm_engine.runner_type == "generate"
    with pytest.raises(ValueError, match=r"runner .generate..*--runner pooling"):
        generating.embed("hello")
    pooling = LLM(path, dtype="float32", kv_cache_memory=2**24, convert="embed")
    assert pooling.llm_engine.runner_type == "pooling"
    with pytest.raises(ValueError, match=r"runner .pooling..*--runner generate"):
        pooling.generate("hello", params, use_tqdm=False)
    with pytest.raises(ValueError, match="runner 'pooling'"):
        pooling.chat([{"role": "user", "content": "hi"}], params, use_tqdm=False)
    with pytest.raises(ValueError, match="runner 'bogus' is not one of auto, generate, pooling"):
        LLM(path, runner="bogus")
    with pytest.raises(ValueError, match="needs runner pooling"):
        LLM(path, runner="generate", convert="embed")


@pytest.mark.parametrize(
    ("architecture", "expected"),
    [("Qwen2ForCausalLM", "generate"), ("Qwen2Model", "pooling"),
     ("MistralModel", "pooling"), ("BertForTextEncoding", "pooling"),
     ("GteEmbeddingModel", "pooling")],
)  # fmt: skip
def test_auto_runner_from_the_architecture_name(architecture: str, expected: str) -> None:
    assert resolve_runner("auto", "auto", [architecture], False) == expected
    assert resolve_runner("auto", "embed", [architecture], False) == "pooling"
    if architecture in ("Qwen2Model", "MistralModel"):  # bodies without an LM head
        with pytest.raises(ValueError, match="without its LM head"):
            resolve_runner("generate", "auto", [architecture], False)
    else:
        assert resolve_runner("generate", "auto", [architecture], True) == "generate"


def test_headless_model_checkpoint_serves_embeddings(
    make_tiny_model: Callable[[str], Path], tmp_path: Path
) -> None:
    """A `*Model` checkpoint (the body, no LM head, weights named without `model.`), as
    embedding models are often saved: runner auto pools it, generation is refused."""
    body = AutoModel.from_pretrained(make_tiny_model("Qwen2ForCausalLM"), dtype=torch.float32)
    folder = tmp_path / "body"
    body.save_pretrained(folder)
    AutoTokenizer.from_pretrained(make_tiny_model("Qwen2ForCausalLM")).save_pretrained(folder)
    assert body.config.architectures == ["Qwen2Model"]
    llm = LLM(str(folder), dtype="float32", kv_cache_memory=2**24)
    assert llm.llm_engine.runner_type == "pooling"
    got = torch.tensor([o.outputs.embedding for o in llm.embed(PROMPTS, "mean", False)])
    with torch.inference_mode():
        want = torch.stack([body(torch.tensor([p])).last_hidden_state[0].mean(0) for p in PROMPTS])
    assert F.cosine_similarity(got, want).min() >= 0.9999
    with pytest.raises(ValueError, match="runner 'pooling'"):
        llm.generate("hello", SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="Qwen2Model is a model body without its LM head"):
        LLM(str(folder), runner="generate")
