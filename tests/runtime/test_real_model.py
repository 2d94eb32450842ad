"""The default model (SmolLM2-135M-Instruct, GGUF Q4_1) loads directly and matches HF."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from pinnace.runtime import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:",
    "def fibonacci(n):",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def llm(smollm2_gguf: str) -> LLM:
    return LLM(smollm2_gguf, dtype="float32", kv_cache_memory=256 * 2**20, max_model_len=2048)


def test_greedy_tokens_match_transformers_gguf(llm: LLM, smollm2_gguf: str) -> None:
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf),
        gguf_file=os.path.basename(smollm2_gguf),
        dtype=torch.float32,
    ).eval()
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = torch.tensor([tok.encode(prompt)])
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.inference_mode():
            ref = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
            )[0, ids.shape[1] :].tolist()
        assert out.outputs[0].token_ids == ref, prompt
    # Coherent English: the model knows its capital cities.
    assert "Paris" in outs[0].outputs[0].text


def test_chat_uses_the_gguf_chat_template(llm: LLM) -> None:
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=32),
        use_tqdm=False,
    )[0]
    text = out.outputs[0].text
    assert "Paris" in text
    assert out.outputs[0].finish_reason in ("stop", "length")
    assert "<|im_start|>" in llm.get_tokenizer().decode(out.prompt_token_ids)
