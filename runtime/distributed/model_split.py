"""Can a model be split tp x pp ways? One-line errors naming the constraint, before load."""

from __future__ import annotations

from typing import Any


def check_model_split(model_config: Any, tensor_parallel_size: int, pp_size: int) -> None:
    """ValueError unless the attention heads, MLP width and layers split evenly.

    Query heads and the MLP's intermediate size split over the tensor ranks; KV heads split
    too, or are replicated when there are fewer KV heads than ranks (then the ranks must be
    a multiple of them, so each KV head serves whole query-head groups).
    """
    tp = tensor_parallel_size
    text = getattr(model_config, "text_config", None) or model_config
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(text, "num_key_value_heads", 0) or heads)
    if heads and heads % tp:
        raise ValueError(
            f"tensor_parallel_size={tp} must divide the model's {heads} attention heads."
        )
    if kv_heads and kv_heads % tp and tp % kv_heads:
        raise ValueError(
            f"tensor_parallel_size={tp} must divide the model's {kv_heads} KV heads or be "
            "a multiple of them (fewer KV heads than ranks are replicated)."
        )
    for name in ("intermediate_size", "moe_intermediate_size"):
        width = int(getattr(text, name, 0) or 0)
        if width and width % tp:
            raise ValueError(f"tensor_parallel_size={tp} must divide the model's {name} ({width}).")
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    if layers and pp_size > layers:
        raise ValueError(
            f"pipeline_parallel_size={pp_size} exceeds the model's {layers} layers "
            "(each stage needs at least one)."
        )
