"""The projections an adapter may target, and their shapes in the base model.

PEFT names HF's separate projections; our models pack some of them into one matmul, so a
target is a *part* of one of our modules (a range of its output rows):

    PEFT / HF module        our module              its output rows
    self_attn.q_proj   ->   self_attn.qkv_proj      [0, q)
    self_attn.k_proj   ->   self_attn.qkv_proj      [q, q + kv)
    self_attn.v_proj   ->   self_attn.qkv_proj      [q + kv, q + 2kv)
    self_attn.o_proj   ->   self_attn.o_proj        all
    mlp.gate_proj      ->   mlp.gate_up_proj        [0, i)
    mlp.up_proj        ->   mlp.gate_up_proj        [i, 2i)
    mlp.down_proj      ->   mlp.down_proj           all
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

# PEFT module names an adapter may target (vLLM's supported set for Llama-like models).
SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TargetModule:
    """One of our modules inside every decoder layer, and the PEFT parts packed in it."""

    path: str  # inside a decoder layer, e.g. "self_attn.qkv_proj"
    parts: tuple[str, ...]  # PEFT module names, in output-row order
    in_features: int
    out_sizes: tuple[int, ...]  # output rows of each part

    @property
    def out_features(self) -> int:
        return sum(self.out_sizes)

    def rows(self, part: int) -> slice:
        start = sum(self.out_sizes[:part])
        return slice(start, start + self.out_sizes[part])


@dataclass(frozen=True)
class LoRAModelSpec:
    """Everything adapter loading needs to know about the base model (immutable: safe to
    read from any thread)."""

    num_layers: int
    modules: tuple[TargetModule, ...]

    def locate(self, peft_module: str) -> tuple[TargetModule, int]:
        """(our module, part index) for a PEFT module name such as "q_proj"."""
        for module in self.modules:
            if peft_module in module.parts:
                return module, module.parts.index(peft_module)
        raise KeyError(peft_module)

    def module(self, path: str) -> TargetModule:
        return next(m for m in self.modules if m.path == path)


def model_spec(model: nn.Module) -> LoRAModelSpec:
    """The target modules of a Llama-like model built by pinnace.runtime.models."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no decoder layers LoRA can attach to.")
    attn: Any = layers[0].self_attn
    mlp: Any = layers[0].mlp
    config: Any = model.config
    hidden = int(config.hidden_size)
    q, kv, inter = int(attn.q_size), int(attn.kv_size), int(mlp.intermediate_size)
    modules = (
        TargetModule("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj"), hidden, (q, kv, kv)),
        TargetModule("self_attn.o_proj", ("o_proj",), q, (hidden,)),
        TargetModule("mlp.gate_up_proj", ("gate_proj", "up_proj"), hidden, (inter, inter)),
        TargetModule("mlp.down_proj", ("down_proj",), inter, (hidden,)),
    )
    return LoRAModelSpec(len(layers), modules)
