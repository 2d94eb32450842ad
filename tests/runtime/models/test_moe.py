"""Experts run as grouped matmuls equal the per-token definition, and a batch's tokens
really are routed to different experts (so the MoE parity tests exercise routing).
Quantized experts: int8 and fp8 at load quantize them; GPTQ, AWQ and FP8 checkpoints of an
MoE model are refused at load with the reason."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.layers.moe import FusedExperts, route
from pinnace.runtime.layers.quantization.experts import QuantizedFusedExperts

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers cache rename


def test_grouped_experts_equal_a_loop_over_tokens() -> None:
    torch.manual_seed(0)
    experts = FusedExperts(num_experts=4, hidden=16, intermediate=8, act="silu")
    for param in experts.parameters():
        nn.init.normal_(param)
    x = torch.randn(6, 16)
    # Every token its own pair of experts; expert 3 gets no token (an empty group).
    ids = torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [2, 1], [1, 0]])
    weights = torch.rand(6, 2)
    expected = torch.zeros_like(x)
    for t in range(6):
        for k in range(2):
            e = int(ids[t, k])
            gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
            h = experts.down_proj[e] @ (nn.functional.silu(gate) * up)
            expected[t] += weights[t, k] * h
    torch.testing.assert_close(experts(x, ids, weights), expected)


def test_route_renormalises_only_when_asked() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    weights, ids = route(logits, 2, renormalize=False)
    assert ids.tolist() == [[0, 1]] and weights.sum() < 1
    weights, _ = route(logits, 2, renormalize=True)
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))


def test_tokens_in_one_batch_hit_different_experts(
    make_tiny_model: Callable[[str], Path],
) -> None:
    llm = LLM(str(make_tiny_model("MixtralForCausalLM")), dtype="float32", kv_cache_memory=2**24)
    block = llm.llm_engine.runner.model.model.layers[0].block_sparse_moe
    chosen: list[torch.Tensor] = []
    hook = block.gate.register_forward_hook(
        lambda _m, _i, logits: chosen.append(route(logits, 2, True)[1])
    )
    try:
        llm.generate([[5, 17, 300, 4000, 9], [123, 77]], SamplingParams(max_tokens=2))
    finally:
        hook.remove()
    first_step = chosen[0]  # [7 prompt tokens, top-2]: both prompts in one batch
    assert first_step.shape == (7, 2)
    assert len({tuple(sorted(row)) for row in first_step.tolist()}) > 1
    assert len(set(first_step.flatten().tolist())) >= 3


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_experts_quantized_at_load(
    method: str, make_tiny_model: Callable[[str], Path], hf_greedy: Callable[..., list[int]]
) -> None:
    """int8 and fp8 at load quantize the stacked experts too (codes [E, out, in] with a
    scale per expert row), and the model still generates close to the float one."""
    path = make_tiny_model("MixtralForCausalLM")
    llm = LLM(str(path), dtype="float32", quantization=method, kv_cache_memory=2**24)
    model = llm.llm_engine.runner.model
    assert not any(isinstance(m, FusedExperts) for m in model.modules())
    experts = [m for m in model.modules() if isinstance(m, QuantizedFusedExperts)]
    assert len(experts) == 2 and experts[0].method == method
    codes_dtype = torch.int8 if method == "int8" else torch.float8_e4m3fn
    assert experts[0].gate_up_codes.dtype == experts[0].down_codes.dtype == codes_dtype
    assert experts[0].gate_up_scale.shape == experts[0].gate_up_codes.shape[:2]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [[5, 17, 300, 4000, 9, 12], list(range(100, 130)), [7, 8], [900, 901, 902]]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    # Near-ties in a random tiny model can flip; a broken expert path matches none of 49k.
    assert sum(g == hf_greedy(hf, p, 1) for g, p in zip(got, prompts, strict=True)) >= 2


CHECKPOINT_QUANTIZATION = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"},
    "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic"},
}


@pytest.mark.parametrize("method", sorted(CHECKPOINT_QUANTIZATION))
@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "Qwen3MoeForCausalLM"])
def test_quantized_expert_checkpoints_are_refused_at_load(
    method: str, arch: str, make_tiny_model: Callable[[str], Path], tmp_path: Path
) -> None:
    folder = tmp_path / "quantized"
    shutil.copytree(make_tiny_model(arch), folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = CHECKPOINT_QUANTIZATION[method]
    (folder / "config.json").write_text(json.dumps(config))
    # Refused before any weight is read (these float weights would fail differently).
    message = rf"{method} checkpoints of {arch} cannot be loaded: its experts run stacked"
    with pytest.raises(ValueError, match=message):
        LLM(str(folder), dtype="float32", kv_cache_memory=2**24)
