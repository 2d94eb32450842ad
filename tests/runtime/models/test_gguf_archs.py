"""Architectures beyond Llama read from GGUF: a tiny Qwen3 file (q/k norms, no biases)
generates transformers' `gguf_file=` greedy tokens."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoModelForCausalLM

from pinnace.runtime import LLM, SamplingParams


def _tiny_gguf() -> object:
    """tests/runtime/tiny_gguf.py (a sibling of the test files, not a package)."""
    path = Path(__file__).resolve().parents[1] / "tiny_gguf.py"
    spec = importlib.util.spec_from_file_location("tiny_gguf", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["tiny_gguf"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_tiny_qwen3_gguf_matches_transformers(
    tmp_path: Path, hf_greedy: Callable[..., list[int]]
) -> None:
    tiny: object = _tiny_gguf()
    path = tmp_path / "qwen3.gguf"
    # transformers' GGUF config for qwen3 ignores key_length: head_dim stays Qwen3's 128.
    spec = tiny.Tiny(arch="qwen3", heads=2, kv_heads=1, tied=False)  # type: ignore[attr-defined]
    tiny.write_tiny(path, spec, Q.Q8_0, np.random.default_rng(3))  # type: ignore[attr-defined]
    llm = LLM(str(path), dtype="float32", kv_cache_memory=2**22)
    assert llm.llm_engine.model_config.architectures == ["Qwen3ForCausalLM"]
    prompts = [[1, 5, 9, 2], [7, 3]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    hf = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    ).eval()
    assert ours == [hf_greedy(hf, p, 8) for p in prompts]
