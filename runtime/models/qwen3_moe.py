"""Qwen3-MoE: Qwen3 (q/k norm, no qkv bias) whose MLP is a mixture of experts without a
shared expert (Qwen2-MoE's routing and layer placement; norm_topk_prob usually on)."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from pinnace.runtime.models.base import ExpertMapping
from pinnace.runtime.models.mixtral import MOE_LORA_TARGETS
from pinnace.runtime.models.qwen2_moe import QWEN_EXPERTS, QwenMoeBlock, is_moe_layer
from pinnace.runtime.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    expert_params_mapping: ClassVar[ExpertMapping] = QWEN_EXPERTS
    lora_target_modules = MOE_LORA_TARGETS

    def _mlp(self, layer_idx: int) -> nn.Module:
        if is_moe_layer(self.config, layer_idx):
            return QwenMoeBlock(self.config)
        return super()._mlp(layer_idx)

    def _sliding_window(self, layer_idx: int) -> int | None:
        # HF applies the config's window (None unless use_sliding_window) to every layer.
        return getattr(self.config, "sliding_window", None)
