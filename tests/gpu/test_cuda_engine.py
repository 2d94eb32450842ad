"""The engine on CUDA: same greedy tokens as transformers; bf16 runs; KV budget from the GPU."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pinnace.runtime import LLM, SamplingParams

pytestmark = pytest.mark.gpu


def test_cuda_greedy_parity(make_tiny_model: Callable[[str], Path]) -> None:
    path = make_tiny_model("Qwen2ForCausalLM")
    llm = LLM(str(path), dtype="float32", device="cuda", gpu_memory_utilization=0.3)
    assert llm.llm_engine.device.type == "cuda"
    prompts = [[5, 6, 7], list(range(100, 400))]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    for prompt, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([prompt], device="cuda")
        ref = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=16,
            min_new_tokens=16,
            do_sample=False,
        )[0, len(prompt) :].tolist()
        assert out.outputs[0].token_ids == ref


def test_cuda_bf16_smoke(make_tiny_model: Callable[[str], Path]) -> None:
    llm = LLM(str(make_tiny_model("LlamaForCausalLM")), dtype="bfloat16", device="cuda")
    assert llm.llm_engine.parts.num_blocks > 1000  # budget from gpu_memory_utilization
    out = llm.generate(["Hello"] * 8, SamplingParams(max_tokens=8, temperature=0.8, seed=1))
    assert all(len(o.outputs[0].token_ids) == 8 for o in out)
