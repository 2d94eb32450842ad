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
    for name in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        width = int(getattr(text, name, 0) or 0)
        if width and width % tp:
            raise ValueError(f"tensor_parallel_size={tp} must divide the model's {name} ({width}).")
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    if layers and pp_size > layers:
        raise ValueError(
            f"pipeline_parallel_size={pp_size} exceeds the model's {layers} layers "
            "(each stage needs at least one)."
        )


def check_split_support(config: Any, ckpt: Any, quant: Any) -> None:
    """ValueError for what tensor ranks do not shard and pipeline stages do not split (yet),
    before any weight is read: `config` an EngineConfig, `ckpt` a Checkpoint, `quant` its
    QuantizationConfig. Nothing to check for a single rank."""
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    if tp == 1 and pp == 1:
        return
    # The message names every setting that splits the model and how each would need to
    # split what it cannot, so the user sees which setting to drop.
    parts = [(tp, "tensor_parallel_size", "sharded across ranks"),
             (pp, "pipeline_parallel_size", "split across stages")]  # fmt: skip
    used = [(size, name, how) for size, name, how in parts if size > 1]
    layout = " x ".join(f"{name}={size}" for size, name, _ in used)
    unsplit = " or ".join(how for _, _, how in used)
    single = " and ".join(f"{name}=1" for _, name, _ in used)
    if ckpt.format != "safetensors":
        raise ValueError(
            f"{layout} needs a safetensors checkpoint: a {ckpt.format} file is not read "
            "in parts (each rank would read the whole model)."
        )
    if quant is not None and quant.from_checkpoint:
        raise ValueError(
            f"{layout} with a {quant.method} checkpoint is not supported: a quantized "
            "checkpoint is not read in parts. Use the float checkpoint with "
            "quantization='int8' or 'fp8' (quantized after the split)."
        )
    if config.enable_lora:
        raise ValueError(
            f"{layout} with LoRA adapters is not supported: adapters are not {unsplit}; "
            f"serve them with {single}."
        )
    spec = config.speculative
    if spec is not None and spec.method == "draft_model":
        raise ValueError(
            f"{layout} with a speculative draft model is not supported: the draft is not "
            f"{unsplit}; use method 'ngram' or {single}."
        )
