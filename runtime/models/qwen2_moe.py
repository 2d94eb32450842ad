"""Qwen2-MoE: Qwen2 whose MLP is a mixture of experts plus a shared expert: the top-k
routed experts (weights not renormalised unless norm_topk_prob) are added to a dense
`shared_expert` MLP scaled by sigmoid(shared_expert_gate(x)). Layers listed in
mlp_only_layers, or off the decoder_sparse_step grid, keep a dense MLP."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from pinnace.runtime.layers.moe import SparseMoeBlock
from pinnace.runtime.models.base import ExpertMapping
from pinnace.runtime.models.llama import LlamaMLP
from pinnace.runtime.models.mixtral import MOE_LORA_TARGETS
from pinnace.runtime.models.qwen2 import Qwen2ForCausalLM

QWEN_EXPERTS: ExpertMapping = {
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}


class QwenMoeBlock(SparseMoeBlock):
    """The routed experts as Qwen-MoE configs size them (Qwen3-MoE's whole block)."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(
            config.hidden_size,
            config.num_experts,
            config.num_experts_per_tok,
            config.moe_intermediate_size,
            config.hidden_act,
            config.norm_topk_prob,
        )


class Qwen2MoeSparseMoeBlock(QwenMoeBlock):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.shared_expert = LlamaMLP(config, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return super().forward(x) + shared


def is_moe_layer(config: PretrainedConfig, layer_idx: int) -> bool:
    """HF's rule for which layers get experts."""
    sparse_step = (layer_idx + 1) % config.decoder_sparse_step == 0
    return layer_idx not in config.mlp_only_layers and config.num_experts > 0 and sparse_step


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    expert_params_mapping: ClassVar[ExpertMapping] = QWEN_EXPERTS
    lora_target_modules = MOE_LORA_TARGETS

    def _mlp(self, layer_idx: int) -> nn.Module:
        if is_moe_layer(self.config, layer_idx):
            return Qwen2MoeSparseMoeBlock(self.config)
        return super()._mlp(layer_idx)
