"""Gemma 2: Llama with these differences

- RMSNorm weights are offsets from 1 (GemmaRMSNorm), and each sublayer's output is normed
  again before the residual add (four norms per layer: pre/post attention, pre/post MLP);
- embeddings are scaled by sqrt(hidden_size); the MLP is GeGLU (gelu-tanh gate);
- attention scores are scaled by query_pre_attn_scalar ** -0.5 and soft-capped
  (cap * tanh(s / cap)); layers alternate sliding-window and global attention;
- the final logits are soft-capped too.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from pinnace.runtime.layers.norm import GemmaRMSNorm
from pinnace.runtime.layers.rotary import RotaryEmbedding
from pinnace.runtime.models.llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
)


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, self_attn: nn.Module) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.mlp = LlamaMLP(config, act=config.hidden_activation)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(positions, self.input_layernorm(hidden))
        hidden = hidden + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(mlp)


class Gemma2ForCausalLM(LlamaForCausalLM):
    def _model(self, layers: list[nn.Module]) -> LlamaModel:
        scale = self.config.hidden_size**0.5
        return LlamaModel(self.config, layers, norm=GemmaRMSNorm, embed_scale=scale)

    def _layer(self, i: int) -> nn.Module:
        config = self.config
        qkv_bias, o_bias = self._attention_biases()
        attn = LlamaAttention(
            config,
            i,
            self._rotary_of(i),
            qkv_bias,
            o_bias,
            self.qk_norm,
            self._sliding_window(i),
            scale=config.query_pre_attn_scalar**-0.5,
            softcap=config.attn_logit_softcapping,
            norm=GemmaRMSNorm,
        )
        return Gemma2DecoderLayer(config, attn)

    def _rotary_of(self, layer_idx: int) -> RotaryEmbedding:
        return self.rotary

    def _sliding_window(self, layer_idx: int) -> int | None:
        is_sliding = self.config.layer_types[layer_idx] == "sliding_attention"
        return self.config.sliding_window if is_sliding else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:  # in the model dtype, as HF
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
