"""One layer's weight as the checkpoint stores it (a "part"), and the layer built from parts.

A part is one HF linear layer — or one shard of our packed qkv_proj / gate_up_proj:

    Int4Weight   GPTQ / AWQ / GGUF Q4_* codes with per-group scales
    Fp8Part      e4m3 codes with per-tensor, per-channel or block scales
    FloatPart    a plain float weight (a layer the checkpoint left unquantized)

Shards of one packed layer are concatenated along the output dimension when they share a
format; mixed shards are all dequantized into a float layer (correct, just not compact).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pinnace.runtime.layers.quantization.awq import AWQ_TENSORS, awq_to_int4
from pinnace.runtime.layers.quantization.config import (
    AWQConfig,
    Fp8CheckpointConfig,
    GPTQConfig,
    QuantizationConfig,
)
from pinnace.runtime.layers.quantization.fp8 import FP8_DTYPE, Fp8Linear, expand_block_scales
from pinnace.runtime.layers.quantization.gguf import GGUFBlocks, gguf_blocks_to_int4
from pinnace.runtime.layers.quantization.gptq import GPTQ_REQUIRED, GPTQ_TENSORS, gptq_to_int4
from pinnace.runtime.layers.quantization.int4 import Int4Linear, Int4Weight

logger = logging.getLogger(__name__)


@dataclass
class Fp8Part:
    codes: torch.Tensor  # e4m3 [N, K]
    scale: torch.Tensor  # float32 [N] per channel, or [ceil(N / bn), ceil(K / bk)] blocks
    block_size: tuple[int, int] | None

    def dequantize(self) -> torch.Tensor:
        weight = self.codes.float()
        if self.block_size is None:
            return weight * self.scale[:, None]
        return weight * expand_block_scales(self.scale, self.block_size, weight.shape)


@dataclass
class FloatPart:
    weight: torch.Tensor  # [N, K]

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()


WeightPart = Int4Weight | Fp8Part | FloatPart


def part_from_tensors(
    tensors: dict[str, Any], quant: QuantizationConfig, name: str, final: bool
) -> WeightPart | None:
    """The part once `tensors` (attr -> value) holds enough of it, else None (wait for more).

    With `final` (the checkpoint is exhausted) nothing is awaited: a layer missing a
    required tensor raises ValueError naming it.
    """
    weight = tensors.get("weight")
    if isinstance(weight, GGUFBlocks):
        return gguf_blocks_to_int4(weight.type_name, weight.data, weight.shape[1])
    if isinstance(weight, torch.Tensor) and weight.dtype == FP8_DTYPE:
        scale = tensors.get("weight_scale", tensors.get("weight_scale_inv"))
        if scale is None:
            return _missing(name, ["weight_scale"], final)
        return fp8_part(weight, scale, quant, name)
    if isinstance(weight, torch.Tensor):
        _no_extra(name, tensors, {"weight"})
        return FloatPart(weight)
    ckpt = quant.checkpoint
    if isinstance(ckpt, GPTQConfig):
        _no_extra(name, tensors, set(GPTQ_TENSORS))
        absent = [k for k in GPTQ_REQUIRED if k not in tensors]
        if absent or ("g_idx" not in tensors and not final):
            return _missing(name, absent, final)  # g_idx is optional: wait until the end
        return gptq_to_int4(tensors, ckpt, name)
    if isinstance(ckpt, AWQConfig):
        _no_extra(name, tensors, set(AWQ_TENSORS))
        absent = [k for k in AWQ_TENSORS if k not in tensors]
        return _missing(name, absent, final) if absent else awq_to_int4(tensors, ckpt, name)
    return _missing(name, ["weight"], final)


def _missing(name: str, absent: list[str], final: bool) -> WeightPart | None:
    """None (wait for more tensors) unless the checkpoint is exhausted: then a ValueError."""
    if final:
        raise ValueError(f"checkpoint lacks {', '.join(absent) or 'tensors'} for layer {name}.")
    return None


def _no_extra(name: str, tensors: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(tensors) - allowed)
    if extra:
        raise ValueError(
            f"layer {name} has unexpected checkpoint tensors {extra} "
            f"(expected {sorted(allowed)}); is the quantization_config right?"
        )


def fp8_part(
    codes: torch.Tensor, scale: torch.Tensor, quant: QuantizationConfig, name: str
) -> Fp8Part:
    """Check an FP8 weight's scale layout: per tensor, per row, or [bn, bk] blocks."""
    rows, cols = codes.shape
    scale = scale.float()
    ckpt = quant.checkpoint
    block = ckpt.weight_block_size if isinstance(ckpt, Fp8CheckpointConfig) else None
    if scale.numel() == 1:
        return Fp8Part(codes, scale.reshape(1).expand(rows).contiguous(), None)
    if scale.numel() == rows and scale.shape in ((rows,), (rows, 1)):
        return Fp8Part(codes, scale.reshape(rows), None)
    if block is not None:
        expected = (-(-rows // block[0]), -(-cols // block[1]))
        if tuple(scale.shape) == expected:
            return Fp8Part(codes, scale, block)
    raise ValueError(
        f"layer {name}: FP8 weight {rows}x{cols} has a scale of shape {tuple(scale.shape)}; "
        f"expected one value, one per row, or blocks of weight_block_size {block}."
    )


def build_linear(
    parts: list[WeightPart],
    bias: nn.Parameter | None,
    dtype: torch.dtype,
    device: torch.device,
    name: str,
) -> nn.Module:
    """The layer for `parts` (shards in order), in the most compact form they allow."""
    int4 = [p for p in parts if isinstance(p, Int4Weight)]
    if len(int4) == len(parts):
        try:
            return Int4Linear(Int4Weight.concat(int4), bias, dtype, device)
        except ValueError as error:
            logger.info("%s: %s; loading it as a float layer", name, error)
    if all(isinstance(p, Fp8Part) for p in parts):
        fp8 = [p for p in parts if isinstance(p, Fp8Part)]
        block = fp8[0].block_size
        # Block scales concatenate only when no block straddles two shards.
        if all(p.block_size == block for p in fp8) and (
            block is None or all(p.codes.shape[0] % block[0] == 0 for p in fp8)
        ):
            codes = torch.cat([p.codes for p in fp8]).to(device)
            scale = torch.cat([p.scale for p in fp8]).to(device)
            return Fp8Linear(codes, scale, bias, block)
    floats = [p.weight for p in parts if isinstance(p, FloatPart)]
    if len(floats) == len(parts):
        weight = torch.cat(floats)
    else:
        logger.info("%s: shards stored in different formats; loading it as a float layer", name)
        weight = torch.cat([p.dequantize() for p in parts])
    return float_linear(weight.to(device=device, dtype=dtype), bias)


def float_linear(weight: torch.Tensor, bias: nn.Parameter | None) -> nn.Linear:
    """An nn.Linear around existing tensors (no random init)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.bias = bias  # type: ignore[assignment]  # nn.Linear allows None
    return linear
