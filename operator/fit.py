"""Will the model fit the GPUs it asks for? A deliberately rough, conservative estimate.

Only an *obvious* misfit is reported: the weights plus the KV cache of a single
`maxModelLen` sequence (the least a vLLM-style engine needs to start) exceed
`gpu.memory × gpuMemoryUtilization` per GPU, with weights and KV cache split over the
replica's `tensorParallelSize x pipelineParallelSize` GPUs (all pods of a multi-node
group). The shape comes from `model.parameterCount` or, when the model is a local
directory (file://), from its config.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes.utils import parse_quantity

from pinnace.operator import names
from pinnace.operator.llmdeployment import LLMDeployment, SpecError

GIB = 1024**3
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
# Bytes per weight; "auto" is assumed to load as bfloat16.
_DTYPE_BYTES = {"auto": 2.0, "float32": 4.0, "bfloat16": 2.0, "float16": 2.0}
# gguf: 4-bit blocks stay 4-bit (Q4_*), other block types become int8; 4.5 bits is Q4_1's.
_QUANT_BYTES = {"int8": 1.0, "fp8": 1.0, "gptq": 0.5, "awq": 0.5, "gguf": 0.5625}


@dataclass(frozen=True)
class ModelShape:
    num_params: int
    num_layers: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int | None = None
    embedding_params: int | None = None  # LM head + token embedding (one copy when tied)

    def kv_bytes_per_token(self, bytes_per_value: float) -> float | None:
        if self.num_layers is None or self.num_kv_heads is None or self.head_dim is None:
            return None
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_value  # K and V


def parse_param_count(text: str) -> int:
    """'1.5B' -> 1_500_000_000 (the spec pattern guarantees the format)."""
    suffix = text[-1] if text[-1] in _SUFFIX else ""
    return int(float(text[: len(text) - len(suffix)]) * _SUFFIX[suffix])


def shape_from_hf_config(cfg: dict[str, Any]) -> ModelShape:
    """Parameter count and KV geometry of a Llama-style decoder from its config.json."""
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or hidden // heads
    inter, vocab = cfg.get("intermediate_size", 4 * hidden), cfg["vocab_size"]
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q,o + k,v
    mlp = 3 * hidden * inter  # gate, up, down
    embed = vocab * hidden * (1 if cfg.get("tie_word_embeddings", False) else 2)
    return ModelShape(
        num_params=layers * (attn + mlp + 2 * hidden) + embed + hidden,
        num_layers=layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=cfg.get("max_position_embeddings"),
        embedding_params=embed,
    )


def resolve_shape(llmd: LLMDeployment) -> ModelShape | None:
    model = llmd.spec.model
    if model.parameter_count is not None:
        return ModelShape(num_params=parse_param_count(model.parameter_count))
    if model.uri.startswith("file://"):
        config = Path("/" + model.uri.removeprefix("file://").lstrip("/")) / "config.json"
        if config.is_file():
            return shape_from_hf_config(json.loads(config.read_text()))
    return None


@dataclass(frozen=True)
class FitEstimate:
    weights_bytes: float  # per GPU
    kv_bytes: float | None  # one maxModelLen sequence, per GPU
    budget_bytes: float  # per GPU

    @property
    def fits(self) -> bool:
        return self.weights_bytes + (self.kv_bytes or 0.0) <= self.budget_bytes

    def describe(self) -> str:
        need = self.weights_bytes + (self.kv_bytes or 0.0)
        kv = f" + KV cache {self.kv_bytes / GIB:.1f} GiB" if self.kv_bytes is not None else ""
        return (
            f"needs ~{need / GIB:.1f} GiB per GPU (weights {self.weights_bytes / GIB:.1f} GiB{kv}) "
            f"but gpu.memory x gpuMemoryUtilization leaves {self.budget_bytes / GIB:.1f} GiB"
        )


def estimate(llmd: LLMDeployment, shape: ModelShape) -> FitEstimate | None:
    """None when there is nothing to check against (CPU, or gpu.memory not declared)."""
    gpu, engine = llmd.spec.resources.gpu, llmd.spec.engine
    if gpu is None or gpu.count == 0 or gpu.memory is None:
        return None
    ranks = engine.world_size  # the whole replica: one pod's GPUs, or a group's
    weight_bytes = _QUANT_BYTES.get(engine.quantization or "", _DTYPE_BYTES[engine.dtype])
    weights = shape.num_params * weight_bytes
    if not engine.effective_quantize_lm_head and shape.embedding_params is not None:
        # int8 / fp8 at load leave the LM head and the embedding in the model dtype.
        weights += shape.embedding_params * (_DTYPE_BYTES[engine.dtype] - weight_bytes)
    kv_value_bytes = 1.0 if engine.kv_cache_dtype == "fp8" else _DTYPE_BYTES[engine.dtype]
    per_token = shape.kv_bytes_per_token(kv_value_bytes)
    seq_len = engine.max_model_len or shape.max_position_embeddings
    kv = per_token * seq_len / ranks if per_token is not None and seq_len else None
    return FitEstimate(
        weights_bytes=weights / ranks,
        kv_bytes=kv,
        budget_bytes=float(parse_quantity(gpu.memory)) * engine.gpu_memory_utilization,
    )


def check_fit(llmd: LLMDeployment) -> None:
    """Raise SpecError(reason=InsufficientGPUMemory) for an obvious misfit."""
    if llmd.annotations.get(names.ANNOTATION_SKIP_FIT_CHECK) == "true":
        return
    shape = resolve_shape(llmd)
    est = estimate(llmd, shape) if shape is not None else None
    if est is not None and not est.fits:
        raise SpecError(
            f"model will not fit: {est.describe()}; use more or larger GPUs, quantization, "
            f"or a shorter maxModelLen (annotate {names.ANNOTATION_SKIP_FIT_CHECK}=true "
            "to override)",
            reason="InsufficientGPUMemory",
        )


def startup_budget_seconds(llmd: LLMDeployment) -> int:
    """How long a replica may take to load before the startupProbe gives up."""
    shape = resolve_shape(llmd)
    if shape is None:
        return 1800
    # ~30 s per billion parameters on top of 5 minutes, within [5 min, 1 h].
    return min(3600, 300 + 30 * math.ceil(shape.num_params / 1e9))
