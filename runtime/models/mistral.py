"""Mistral: Llama plus a sliding attention window."""

from __future__ import annotations

from pinnace.runtime.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    def _sliding_window(self, layer_idx: int) -> int | None:
        return getattr(self.config, "sliding_window", None)
