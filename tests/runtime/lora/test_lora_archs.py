"""LoRA on the architectures beyond Llama: attention and MLP adapters give transformers +
peft's greedy tokens (Phi-3's fused qkv_proj / gate_up_proj targeted whole); on MoE models,
where only attention can carry an adapter, one that targets an MLP is refused by name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pinnace.runtime import LLM, LoRARequest, SamplingParams

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

TARGETS = {
    "Gemma2ForCausalLM": ["q_proj", "v_proj", "gate_proj", "down_proj"],
    "Phi3ForCausalLM": ["qkv_proj", "o_proj", "gate_up_proj"],
    "Qwen3MoeForCausalLM": ["q_proj", "k_proj", "o_proj"],
}
PROMPTS = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46, 26, 43]]
NEW_TOKENS = 8


@pytest.mark.parametrize("arch", list(TARGETS))
def test_adapter_matches_peft(
    arch: str,
    make_tiny_model: Callable[[str], Path],
    save_adapter: Callable[..., Path],
    hf_greedy: Callable[..., list[int]],
    tmp_path: Path,
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = make_tiny_model(arch)
    adapter = save_adapter(base, tmp_path / "adapter", 3, r=4, target_modules=TARGETS[arch])
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, adapter).eval()
    expected = [hf_greedy(peft_model, p, NEW_TOKENS) for p in PROMPTS]

    llm = LLM(str(base), dtype="float32", kv_cache_memory=2**24, enable_lora=True)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    request = LoRARequest("adapter", 1, str(adapter))
    outs = llm.generate(PROMPTS, params, lora_request=request, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    plain = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in plain] != expected  # the adapter changed them


def test_moe_adapter_on_an_mlp_is_refused(
    make_tiny_model: Callable[[str], Path], save_adapter: Callable[..., Path], tmp_path: Path
) -> None:
    base = make_tiny_model("Qwen2MoeForCausalLM")
    # gate_proj: the shared expert's and the dense layer's, both plain linears to peft.
    adapter = save_adapter(base, tmp_path / "mlp", 0, r=4, target_modules=["q_proj", "gate_proj"])
    llm = LLM(str(base), dtype="float32", kv_cache_memory=2**24, enable_lora=True)
    with pytest.raises(ValueError) as err:
        llm.generate([1, 2, 3], lora_request=LoRARequest("mlp", 1, str(adapter)), use_tqdm=False)
    assert (
        "targets gate_proj; LoRA serving supports only q_proj, k_proj, v_proj, o_proj on "
        "Qwen2MoeForCausalLM" in str(err.value)
    )
