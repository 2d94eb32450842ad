"""Qwen3-MoE: Qwen3 (q/k norm, no qkv bias) whose MLP is a mixture of experts without a
shared expert (Qwen2-MoE's routing and layer placement; norm_topk_prob usually on)."""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from transformers import PretrainedConfig

from pinnace.runtime.layers.moe import SparseMoeBlock
from pinnace.runtime.models.base import ExpertMapping
from pinnace.runtime.models.mixtral import MOE_LORA_TARGETS
from pinnace.runtime.models.qwen2_moe import QWEN_EXPERTS, is_moe_layer
from pinnace.runtime.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeSparseMoeBlock(SparseMoeBlock):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(
            config.hidden_size,
            config.num_experts,
            config.num_experts_per_tok,
            config.moe_intermediate_size,
            config.hidden_act,
            config.norm_topk_prob,
        )


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    expert_params_mapping: ClassVar[ExpertMapping] = QWEN_EXPERTS
    lora_target_modules = MOE_LORA_TARGETS

    def _mlp(self, layer_idx: int) -> nn.Module:
        if is_moe_layer(self.config, layer_idx):
            return Qwen3MoeSparseMoeBlock(self.config)
        return super()._mlp(layer_idx)

    def _sliding_window(self, layer_idx: int) -> int | None:
        # HF applies the config's window (None unless use_sliding_window) to every layer.
        return getattr(self.config, "sliding_window", None)
