"""Qwen2: Llama with a bias on q/k/v (not on o_proj) and an optional sliding window."""

from __future__ import annotations

from pinnace.runtime.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def _attention_biases(self) -> tuple[bool, bool]:
        # Qwen2 configs carry no attention_bias flag: the bias is part of the architecture.
        return True, False

    def _sliding_window(self, layer_idx: int) -> int | None:
        return qwen_sliding_window(self.config, layer_idx)


def qwen_sliding_window(config: object, layer_idx: int) -> int | None:
    # HF: the window applies only when enabled, and only from max_window_layers on.
    if not getattr(config, "use_sliding_window", False):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return config.sliding_window if layer_types[layer_idx] == "sliding_attention" else None  # type: ignore[attr-defined]
    return config.sliding_window if layer_idx >= config.max_window_layers else None  # type: ignore[attr-defined]
