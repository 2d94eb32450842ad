"""Load checkpoints whose linear weights are stored quantized (GPTQ, AWQ, FP8, GGUF blocks).

    shells = install_shells(model)            # on the meta device, before materialising
    router = QuantizedWeightRouter(model, shells, quant, dtype, device)
    model.load_weights(router.route(weights)) # quantized parts stop here, the rest flows on
    router.finish()                           # quantized layers replace the shells

A shell stands in for an nn.Linear and owns only its bias, so materialising the model
allocates no float weight the checkpoint does not have. The router gathers each layer's
tensors (qweight/qzeros/scales/g_idx, weight/weight_scale, ...) per shard — HF's q/k/v are
shards 0/1/2 of our packed qkv_proj, as the model class's `packed_modules_mapping` says —
and builds the layer once all shards are in.
A shell whose checkpoint tensors turn out to be plain floats becomes an nn.Linear.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from pinnace.runtime.layers.packed import PackedMapping, to_our_module
from pinnace.runtime.layers.quantization.config import Fp8CheckpointConfig, QuantizationConfig
from pinnace.runtime.layers.quantization.parts import WeightPart, build_linear, part_from_tensors

logger = logging.getLogger(__name__)

# Tensors that only serve kernels or calibration we do not use (FP8 checkpoints' static
# activation and attention scales): accepted and dropped.
_IGNORED = frozenset({"input_scale", "k_scale", "v_scale", "kv_scale"})


class LinearShell(nn.Module):
    """Placeholder for a linear layer whose weight the checkpoint stores quantized."""

    def __init__(self, in_features: int, out_features: int, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a quantized layer was used before its weights were loaded")


def install_shells(model: nn.Module) -> dict[str, LinearShell]:
    """Swap every nn.Linear except a tied LM head for a shell; returns them by path."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    shells: dict[str, LinearShell] = {}
    for path, module in list(model.named_modules()):
        if type(module) is not nn.Linear or id(module.weight) in tied:
            continue
        shell = LinearShell(module.in_features, module.out_features, module.bias)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, shell)
        shells[path] = shell
    return shells


class QuantizedWeightRouter:
    def __init__(
        self,
        model: nn.Module,
        shells: dict[str, LinearShell],
        quant: QuantizationConfig,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.model, self.shells, self.quant = model, shells, quant
        # Read from the model class: HF module leaf -> (our packed leaf, shard index).
        self.mapping: PackedMapping = getattr(type(model), "packed_modules_mapping", {})
        self.dtype, self.device = dtype, device
        self._pending: dict[tuple[str, int], dict[str, Any]] = defaultdict(dict)
        self._parts: dict[str, dict[int, WeightPart]] = defaultdict(dict)
        self._built: dict[str, nn.Module] = {}
        self._ignored = 0

    def route(self, weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the tensors the model loads itself; keep the quantized layers' parts."""
        for name, value in weights:
            if not self._take(name, value):
                yield name, value

    def _take(self, name: str, value: Any) -> bool:
        module, _, attr = name.rpartition(".")
        if attr in _IGNORED and isinstance(self.quant.checkpoint, Fp8CheckpointConfig):
            self._ignored += 1
            return True
        target, shard = self._target(module)
        if target not in self.shells or attr == "bias":
            return False  # biases go to the shell's bias parameter through load_weights
        pending = self._pending[(target, shard)]
        if attr in pending:
            raise ValueError(f"checkpoint tensor {name!r} appears twice.")
        pending[attr] = value
        self._try_complete(target, shard, final=False)
        return True

    def _target(self, module: str) -> tuple[str, int]:
        """HF module path -> (our module path, shard index)."""
        target, shard = to_our_module(self.mapping, module)
        return target, shard or 0

    def _try_complete(self, target: str, shard: int, final: bool) -> None:
        pending = self._pending[(target, shard)]
        part = part_from_tensors(pending, self.quant, f"{target}#{shard}", final)
        if part is None:
            return
        del self._pending[(target, shard)]
        parts = self._parts[target]
        parts[shard] = part
        leaf = target.rpartition(".")[2]
        if len(parts) == len(self.mapping.get(leaf, (leaf,))):
            self._build(target)

    def _build(self, target: str) -> None:
        parts = self._parts.pop(target)
        ordered = [parts[i] for i in sorted(parts)]
        shell = self.shells[target]
        module = build_linear(ordered, shell.bias, self.dtype, self.device, target)
        if (module.in_features, module.out_features) != (shell.in_features, shell.out_features):
            raise ValueError(
                f"checkpoint weights for {target} make a {module.in_features} -> "
                f"{module.out_features} layer; the model expects {shell.in_features} -> "
                f"{shell.out_features}."
            )
        self._built[target] = module

    def finish(self) -> None:
        """Build what waited for optional tensors, check completeness, swap the layers in."""
        for target, shard in list(self._pending):
            self._try_complete(target, shard, final=True)
        missing = sorted(set(self.shells) - set(self._built))
        if missing:
            incomplete = {t: sorted(self._parts.get(t, {})) for t in missing[:4]}
            raise ValueError(
                f"checkpoint lacks weights for {len(missing)} quantized layer(s), e.g. "
                f"{missing[:4]} (shards present: {incomplete})."
            )
        for target, module in self._built.items():
            parent, _, name = target.rpartition(".")
            setattr(self.model.get_submodule(parent), name, module)
        if self._ignored:
            logger.info(
                "ignored %d static activation/KV scale tensors: FP8 activations are scaled "
                "per token at run time",
                self._ignored,
            )
