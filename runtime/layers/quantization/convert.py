"""Quantize a loaded float model in place: linear layers and embeddings -> int8 / FP8.

Weight-only methods quantize every matmul weight, the LM head and the token embedding
included (in a small model like SmolLM2-135M the tied embedding is a fifth of the weights,
so a float head would leave batch-1 decode reading 1.2x the bytes); `keep_head` leaves
those two in floats. A tied head and embedding keep one copy of the codes. Routed experts
are quantized too (quantization/experts.py), with the same per-row scheme.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from pinnace.runtime.layers.moe import FusedExperts
from pinnace.runtime.layers.quantization.embedding import QuantizedEmbedding
from pinnace.runtime.layers.quantization.experts import ROW_QUANTIZERS, QuantizedFusedExperts
from pinnace.runtime.layers.quantization.fp8 import Fp8Linear
from pinnace.runtime.layers.quantization.int8 import Int8Linear, frozen

# The modules `keep_head` leaves in floats, by their last path component.
HEAD_MODULES = ("lm_head", "embed_tokens")


def quantize_linears(
    model: nn.Module,
    method: str,
    device: torch.device,
    only: set[str] | None = None,
    row_amax: Mapping[str, torch.Tensor] | None = None,
    keep_head: bool = False,
) -> int:
    """Replace nn.Linear / nn.Embedding modules (those in `only`, or all; never the LM head
    and the token embedding with `keep_head`) by `method` versions on `device`; returns how
    many modules were replaced. `row_amax`: per linear path, its rows' max |w| over the
    whole row (a tensor-parallel shard holds part of it)."""
    if method not in ROW_QUANTIZERS:
        raise ValueError(f"cannot quantize float weights to {method!r}; use int8 or fp8.")
    quantize = ROW_QUANTIZERS[method]
    # id(float weight) -> (codes, scale): a tied LM head reuses its embedding's codes.
    shared: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
    count = 0
    for path, module in list(model.named_modules()):
        if type(module) is not nn.Embedding or (only is not None and path not in only):
            continue
        if keep_head and _is_head(path):
            continue
        weight = module.weight.detach()
        codes, scale = quantize(weight.to(device))
        pair = frozen(codes), frozen(scale.to(weight.dtype) if method == "int8" else scale)
        shared[id(module.weight)] = pair
        _replace(model, path, QuantizedEmbedding(pair[0], pair[1], weight.dtype))
        count += 1
    if only is None:
        count += quantize_experts(model, method, device, row_amax=row_amax)
    for path, module in list(model.named_modules()):
        if type(module) is not nn.Linear or (keep_head and _is_head(path)):
            continue
        tied = shared.get(id(module.weight))
        if tied is None and only is not None and path not in only:
            continue
        amax = (row_amax or {}).get(path)
        _replace(model, path, _quantized_linear(module, method, device, tied, amax))
        count += 1
    return count


def quantize_experts(
    model: nn.Module,
    method: str,
    device: torch.device,
    only: set[str] | None = None,
    row_amax: Mapping[str, torch.Tensor] | None = None,
) -> int:
    """Replace FusedExperts modules (those in `only`, or all) by QuantizedFusedExperts;
    returns how many were replaced. A path in `only` that is not a FusedExperts is an error
    (experts left in floats would pass unnoticed). `row_amax["<path>.down_proj"]`: the
    down rows' max |w| [E, hidden] over the whole rows (tensor-parallel shards)."""
    found = {p for p, m in model.named_modules() if isinstance(m, FusedExperts)}
    if only is not None and only - found:
        raise ValueError(f"no routed experts at {sorted(only - found)[:4]} to quantize.")
    for path in found if only is None else only:
        module = model.get_submodule(path)
        amax = (row_amax or {}).get(f"{path}.down_proj")
        _replace(model, path, QuantizedFusedExperts(module, method, device, amax))  # type: ignore[arg-type]
    return len(found if only is None else only)


def _quantized_linear(
    linear: nn.Linear,
    method: str,
    device: torch.device,
    tied: tuple[nn.Parameter, nn.Parameter] | None,
    amax: torch.Tensor | None = None,
) -> nn.Module:
    bias = linear.bias
    if bias is not None and bias.device != device:
        bias = nn.Parameter(bias.detach().to(device), requires_grad=False)
    if method == "int8":
        if tied is not None:
            return Int8Linear(tied[0], tied[1], bias, linear.weight.dtype)
        codes, scale = ROW_QUANTIZERS[method](linear.weight.detach().to(device), amax)
        return Int8Linear(codes, scale, bias, linear.weight.dtype)
    if tied is not None:
        return Fp8Linear(tied[0], tied[1], bias)
    codes, scale = ROW_QUANTIZERS[method](linear.weight.detach().to(device), amax)
    return Fp8Linear(codes, scale, bias)


def _is_head(path: str) -> bool:
    return path.rpartition(".")[2] in HEAD_MODULES


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)
