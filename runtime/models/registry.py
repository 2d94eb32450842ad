"""Architectures by HF `architectures[0]`, imported lazily."""

from __future__ import annotations

import importlib

from torch import nn

_MODELS = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_model_class(architectures: list[str] | None) -> type[nn.Module]:
    arch = (architectures or ["<none>"])[0]
    if arch not in _MODELS:
        raise ValueError(
            f"architecture {arch!r} is not supported; supported: "
            f"{', '.join(supported_architectures())}"
        )
    module_name, class_name = _MODELS[arch]
    module = importlib.import_module(f"pinnace.runtime.models.{module_name}")
    cls: type[nn.Module] = getattr(module, class_name)
    return cls
