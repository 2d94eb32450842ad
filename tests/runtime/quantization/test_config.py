"""Choosing a quantization: user request vs config.json, and the errors a user can hit."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from pinnace.runtime.config import EngineConfig
from pinnace.runtime.layers.quantization.config import (
    AWQConfig,
    Fp8CheckpointConfig,
    GPTQConfig,
    QuantizationConfig,
    resolve_quantization,
)

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True}


def _hf(quantization_config: dict[str, Any] | None = None) -> SimpleNamespace:
    return SimpleNamespace(quantization_config=quantization_config)


def test_float_checkpoints_quantize_at_load_or_not_at_all() -> None:
    assert resolve_quantization(None, _hf(), "safetensors") is None
    int8 = resolve_quantization("int8", _hf(), "safetensors")
    assert int8 == QuantizationConfig("int8") and int8.quantizes_at_load
    assert resolve_quantization("fp8", _hf(), "gguf") == QuantizationConfig("fp8")
    gguf = resolve_quantization("gguf", _hf(), "gguf")
    assert gguf is not None and gguf.from_checkpoint


def test_checkpoint_methods_are_detected_from_config_json() -> None:
    gptq = resolve_quantization(None, _hf(GPTQ), "safetensors")
    assert gptq == QuantizationConfig("gptq", GPTQConfig(128, desc_act=True, zero_offset=1))
    v2 = resolve_quantization("gptq", _hf({**GPTQ, "checkpoint_format": "gptq_v2"}), "st")
    assert v2 is not None and v2.checkpoint == GPTQConfig(128, True, zero_offset=0)
    awq = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True}
    assert resolve_quantization(None, _hf(awq), "st") == QuantizationConfig("awq", AWQConfig(64))
    fp8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    found = resolve_quantization("fp8", _hf(fp8), "st")
    assert found == QuantizationConfig("fp8", Fp8CheckpointConfig((128, 128)))
    assert found is not None and not found.quantizes_at_load


@pytest.mark.parametrize(
    ("requested", "stored", "fmt", "message"),
    [
        ("int4", None, "st", "quantization 'int4' is not one of int8, fp8, gptq, awq, gguf"),
        ("awq", None, "st", "needs a checkpoint quantized with AWQ"),
        ("gguf", None, "st", "this model is not GGUF"),
        ("fp8", GPTQ, "st", "already quantized with gptq"),
        (None, {"bits": 4}, "st", "has no 'quant_method'"),
        (None, {**GPTQ, "bits": 8}, "st", "bits=8 are not supported"),
        (None, {**GPTQ, "group_size": "128"}, "st", "group_size must be a positive integer"),
        (None, {"quant_method": "awq", "bits": 4}, "st", "missing 'group_size'"),
        (None, {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": False},
         "st", "zero_point=false"),
        (None, {"quant_method": "fp8", "weight_block_size": [128]}, "st", "two positive integers"),
        (None, {"quant_method": "fp8", "fmt": "e5m2"}, "st", "only e4m3"),
        (None, {"quant_method": "fp8", "activation_scheme": "lazy"}, "st", "not one of dynamic"),
        (None, {"quant_method": "compressed-tensors"}, "st", "supported checkpoint methods"),
    ],
)  # fmt: skip
def test_bad_requests_and_malformed_configs_fail_clearly(
    requested: str | None, stored: dict[str, Any] | None, fmt: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_quantization(requested, _hf(stored), fmt)


def test_engine_config_validates_quantization_and_kv_cache_dtype() -> None:
    config = EngineConfig(model="m", quantization="awq", kv_cache_dtype="fp8")
    assert (config.quantization, config.kv_cache_dtype) == ("awq", "fp8")
    with pytest.raises(ValueError, match="quantization 'q4' is not one of"):
        EngineConfig(model="m", quantization="q4")
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp16' is not one of auto, fp8"):
        EngineConfig(model="m", kv_cache_dtype="fp16")
