"""Mixtral: Mistral whose MLP is a sparse mixture of experts (`block_sparse_moe`): a router
picks the top-k of E gated MLPs per token, weights renormalised to sum to 1. The checkpoint
stores each expert as w1 (gate), w3 (up), w2 (down); we stack them per layer."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from pinnace.runtime.layers.moe import SparseMoeBlock
from pinnace.runtime.layers.norm import RMSNorm
from pinnace.runtime.models.base import ExpertMapping
from pinnace.runtime.models.llama import LlamaAttention, LlamaForCausalLM

# Adapters may target attention only: the experts are not linears LoRA can wrap.
MOE_LORA_TARGETS = ("self_attn.qkv_proj", "self_attn.o_proj")


class MixtralDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, self_attn: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.block_sparse_moe = SparseMoeBlock(
            config.hidden_size,
            config.num_local_experts,
            config.num_experts_per_tok,
            config.intermediate_size,
            config.hidden_act,
            renormalize=True,
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden))
        return hidden + self.block_sparse_moe(self.post_attention_layernorm(hidden))


class MixtralForCausalLM(LlamaForCausalLM):
    expert_params_mapping: ClassVar[ExpertMapping] = {
        "w1": ("gate_up_proj", 0),
        "w3": ("gate_up_proj", 1),
        "w2": ("down_proj", 0),
    }
    lora_target_modules = MOE_LORA_TARGETS

    def _layer(self, i: int) -> nn.Module:
        qkv_bias, o_bias = self._attention_biases()
        window = getattr(self.config, "sliding_window", None)
        attn = LlamaAttention(self.config, i, self.rotary, qkv_bias, o_bias, False, window)
        return MixtralDecoderLayer(self.config, attn)
