"""Phi-3: Llama whose checkpoint already stores q/k/v and gate/up fused (`qkv_proj`,
`gate_up_proj`, our own layout), so nothing is packed at load and an adapter targets the
fused modules whole; rotary may be LongRoPE (layers/rotary.py); an optional sliding window
applies to every layer."""

from __future__ import annotations

from typing import ClassVar

from pinnace.runtime.layers.packed import PackedMapping
from pinnace.runtime.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    packed_modules_mapping: ClassVar[PackedMapping] = {}

    def _attention_biases(self) -> tuple[bool, bool]:
        return False, False

    def _sliding_window(self, layer_idx: int) -> int | None:
        return getattr(self.config, "sliding_window", None)
