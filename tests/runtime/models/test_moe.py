"""Experts run as grouped matmuls equal the per-token definition, and a batch's tokens
really are routed to different experts (so the MoE parity tests exercise routing)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.layers.moe import FusedExperts, route


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
