"""Qwen3: Llama with RMSNorm on each head of q and k before rotary, and no qkv bias."""

from __future__ import annotations

from pinnace.runtime.models.llama import LlamaForCausalLM
from pinnace.runtime.models.qwen2 import qwen_sliding_window


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True

    def _sliding_window(self, layer_idx: int) -> int | None:
        return qwen_sliding_window(self.config, layer_idx)
