"""The projections an adapter may target, and their shapes in the base model.

PEFT names HF's separate projections; our models pack some of them into one matmul, so a
target is a *part* of one of our modules (a range of its output rows). Which modules, and
their parts, is what the model class declares (models/base.py); for a Llama-like model:

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

    architecture: str
    num_layers: int
    modules: tuple[TargetModule, ...]

    @property
    def supported_targets(self) -> tuple[str, ...]:
        """PEFT module names an adapter may target on this model."""
        return tuple(part for module in self.modules for part in module.parts)

    def locate(self, peft_module: str) -> tuple[TargetModule, int]:
        """(our module, part index) for a PEFT module name such as "q_proj"."""
        for module in self.modules:
            if peft_module in module.parts:
                return module, module.parts.index(peft_module)
        raise KeyError(peft_module)

    def module(self, path: str) -> TargetModule:
        return next(m for m in self.modules if m.path == path)


def model_spec(model: nn.Module) -> LoRAModelSpec:
    """The target modules of a model built by pinnace.runtime.models, from the facts its
    class declares: `lora_target_modules` (where) and `packed_modules_mapping` (what parts)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    paths: tuple[str, ...] = getattr(model, "lora_target_modules", ())
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or not paths:
        raise ValueError(f"{type(model).__name__} has no decoder layers LoRA can attach to.")
    mapping = getattr(model, "packed_modules_mapping", {})
    modules = []
    for path in paths:
        linear: Any = layers[0].get_submodule(path)
        leaf = path.rpartition(".")[2]
        if leaf in mapping:
            sizes = tuple(model.shard_sizes(f"model.layers.0.{path}"))  # type: ignore[operator]
            parts = tuple(mapping[leaf])
        else:
            sizes, parts = (int(linear.out_features),), (leaf,)
        modules.append(TargetModule(path, parts, int(linear.in_features), sizes))
    return LoRAModelSpec(type(model).__name__, len(layers), tuple(modules))
