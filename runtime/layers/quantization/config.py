"""Which quantization a model runs with: the user's choice checked against the checkpoint.

    resolve_quantization("int8", hf_config, "safetensors") -> QuantizationConfig(method="int8")
    resolve_quantization(None, gptq_config, "safetensors")  -> method="gptq" (from config.json)

Two kinds of methods:
  * quantized at load (`int8`, `fp8` on a float checkpoint): float weights are read, then
    every linear layer and the embedding are quantized (the LM head and the embedding stay
    in the model dtype with `lm_head=False`);
  * stored quantized (`gptq`, `awq`, `fp8` checkpoints, `gguf` blocks kept): the checkpoint's
    codes are loaded as they are, in their own packing.

Every problem with the request or with config.json's `quantization_config` is a ValueError
that says what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

METHODS = ("int8", "fp8", "gptq", "awq", "gguf")
# quant_method values of config.json's quantization_config that can be loaded.
CHECKPOINT_METHODS = ("gptq", "awq", "fp8")
# ggml block types that map exactly onto 4-bit groups of 32 (kept 4-bit by method "gguf");
# every other quantized ggml type is re-quantized to per-channel int8.
GGUF_INT4_TYPES = frozenset({"Q4_0", "Q4_1", "Q4_K"})
GGUF_FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


@dataclass(frozen=True)
class GPTQConfig:
    group_size: int  # input columns per scale/zero; -1 in config.json means all of them
    desc_act: bool  # act-order: g_idx assigns columns to groups in a permuted order
    zero_offset: int  # GPTQ v1 checkpoints store zero - 1 (so add 1); gptq_v2 stores zero


@dataclass(frozen=True)
class AWQConfig:
    group_size: int


@dataclass(frozen=True)
class Fp8CheckpointConfig:
    weight_block_size: tuple[int, int] | None  # [rows, cols] per scale; None: per tensor/row


@dataclass(frozen=True)
class QuantizationConfig:
    method: str  # one of METHODS
    checkpoint: GPTQConfig | AWQConfig | Fp8CheckpointConfig | None = None
    # int8 / fp8 at load: the LM head and the token embedding too (a tied pair keeps one
    # copy of the codes); False keeps both in the model dtype, as vLLM keeps lm_head.
    lm_head: bool = True

    @property
    def quantizes_at_load(self) -> bool:
        """True when float weights are read and quantized here (int8, fp8 from float)."""
        return self.method in ("int8", "fp8") and self.checkpoint is None

    @property
    def from_checkpoint(self) -> bool:
        """True when the checkpoint stores the codes (gptq, awq, fp8 checkpoints, gguf)."""
        return not self.quantizes_at_load


def resolve_quantization(
    requested: str | None, hf_config: Any, checkpoint_format: str, lm_head: bool = True
) -> QuantizationConfig | None:
    """The quantization to run with, or None for plain float weights. `lm_head` False: int8
    / fp8 at load leave the LM head and the token embedding in the model dtype."""
    if requested is not None and requested not in METHODS:
        raise ValueError(f"quantization {requested!r} is not one of {', '.join(METHODS)}.")
    stored = _quantization_config_dict(hf_config)
    if stored is not None:
        parsed = parse_checkpoint_quantization(stored)
        if not lm_head:
            raise ValueError(
                f"the checkpoint is already quantized with {parsed.method}; keeping the LM "
                "head in floats (quantize_lm_head=False) applies to float checkpoints only."
            )
        if requested not in (None, parsed.method):
            raise ValueError(
                f"the checkpoint is already quantized with {parsed.method}; it cannot be "
                f"loaded with quantization={requested!r}. Leave quantization unset or pass "
                f"{parsed.method!r}."
            )
        return parsed
    if requested in ("gptq", "awq"):
        raise ValueError(
            f"quantization={requested!r} needs a checkpoint quantized with {requested.upper()}, "
            "but config.json has no quantization_config. Use 'int8' or 'fp8' to quantize float "
            "weights at load."
        )
    if requested == "gguf" and checkpoint_format != "gguf":
        raise ValueError(
            "quantization='gguf' keeps a GGUF file's blocks quantized; this model is not GGUF."
        )
    return None if requested is None else QuantizationConfig(requested, lm_head=lm_head)


def _quantization_config_dict(hf_config: Any) -> dict[str, Any] | None:
    stored = getattr(hf_config, "quantization_config", None)
    if stored is None:
        return None
    if not isinstance(stored, dict):
        to_dict = getattr(stored, "to_dict", None)
        if to_dict is None:
            raise ValueError(f"config.json quantization_config is not an object: {stored!r}")
        stored = to_dict()
    return dict(stored)


def parse_checkpoint_quantization(stored: dict[str, Any]) -> QuantizationConfig:
    """config.json's `quantization_config` -> QuantizationConfig (ValueError when malformed)."""
    method = stored.get("quant_method")
    if not isinstance(method, str):
        raise ValueError("config.json quantization_config has no 'quant_method'.")
    method = method.lower()
    if method == "gptq":
        return QuantizationConfig("gptq", _parse_gptq(stored))
    if method == "awq":
        return QuantizationConfig("awq", _parse_awq(stored))
    if method == "fp8":
        return QuantizationConfig("fp8", _parse_fp8(stored))
    raise ValueError(
        f"config.json quantization_config quant_method {method!r} is not supported; "
        f"supported checkpoint methods: {', '.join(CHECKPOINT_METHODS)}."
    )


def _parse_gptq(stored: dict[str, Any]) -> GPTQConfig:
    _require_4_bits("GPTQ", stored)
    desc_act = stored.get("desc_act", False)
    if not isinstance(desc_act, bool):
        raise ValueError(f"GPTQ quantization_config desc_act must be true/false, got {desc_act!r}.")
    fmt = stored.get("checkpoint_format", stored.get("format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(
            f"GPTQ checkpoint_format {fmt!r} is not supported; supported: gptq, gptq_v2."
        )
    return GPTQConfig(
        group_size=_group_size("GPTQ", stored),
        desc_act=desc_act,
        zero_offset=1 if fmt == "gptq" else 0,
    )


def _parse_awq(stored: dict[str, Any]) -> AWQConfig:
    _require_4_bits("AWQ", stored)
    version = str(stored.get("version", stored.get("backend", "gemm"))).lower()
    if version not in ("gemm", "autoawq"):
        raise ValueError(
            f"AWQ version {version!r} is not supported; only the GEMM packing ('gemm') is."
        )
    if stored.get("zero_point", True) is not True:
        raise ValueError(
            "AWQ checkpoints without zero points (zero_point=false) are not supported."
        )
    return AWQConfig(group_size=_group_size("AWQ", stored))


def _parse_fp8(stored: dict[str, Any]) -> Fp8CheckpointConfig:
    fmt = stored.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"FP8 checkpoints in format {fmt!r} are not supported; only e4m3.")
    scheme = stored.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ValueError(f"FP8 activation_scheme {scheme!r} is not one of dynamic, static.")
    block = stored.get("weight_block_size")
    if block is None:
        return Fp8CheckpointConfig(weight_block_size=None)
    if (
        not isinstance(block, (list, tuple))
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ValueError(
            f"FP8 weight_block_size must be two positive integers [rows, cols], got {block!r}."
        )
    return Fp8CheckpointConfig(weight_block_size=(block[0], block[1]))


def _require_4_bits(name: str, stored: dict[str, Any]) -> None:
    if "bits" not in stored:
        raise ValueError(f"{name} quantization_config is missing 'bits'.")
    bits = stored["bits"]
    if bits != 4 or isinstance(bits, bool):
        raise ValueError(f"{name} checkpoints with bits={bits!r} are not supported; only 4-bit.")


def _group_size(name: str, stored: dict[str, Any]) -> int:
    if "group_size" not in stored:
        raise ValueError(f"{name} quantization_config is missing 'group_size'.")
    size = stored["group_size"]
    if not isinstance(size, int) or isinstance(size, bool) or not (size == -1 or size > 0):
        raise ValueError(
            f"{name} group_size must be a positive integer or -1 (one group), got {size!r}."
        )
    return size
