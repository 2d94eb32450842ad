"""Packed modules: several HF projections stacked into one of our linears.

A model class declares them as `packed_modules_mapping` (vLLM v1's shape): our fused
module's leaf name -> the HF module leaves it stacks, in output-row order:

    {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

Weight loading, the quantized-weight router and GGUF type selection translate HF module
paths with these helpers (kept here, below both layers and models, so neither imports up).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

PackedMapping = Mapping[str, Sequence[str]]


def packed_parts(mapping: PackedMapping) -> dict[str, tuple[str, int]]:
    """HF module leaf -> (our packed leaf, part index): the mapping turned inside out."""
    return {hf: (packed, i) for packed, parts in mapping.items() for i, hf in enumerate(parts)}


def to_our_module(mapping: PackedMapping, hf_module: str) -> tuple[str, int | None]:
    """An HF module path -> (our module path, part index; None when it is not packed)."""
    prefix, _, leaf = hf_module.rpartition(".")
    found = packed_parts(mapping).get(leaf)
    if found is None:
        return hf_module, None
    return (f"{prefix}.{found[0]}" if prefix else found[0]), found[1]
