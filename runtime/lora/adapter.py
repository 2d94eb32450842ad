"""A PEFT LoRA folder -> validated low-rank weights, packed for our modules.

A PEFT adapter folder holds `adapter_config.json` and `adapter_model.safetensors`, with
tensors named like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`
(A: [r, in], B: [out, r]). PEFT adds `B(A(x)) * scaling` to the projection's output, with
scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.

Packed form of one of our modules (see targets.py) that an adapter targets in n parts,
each padded to the module's rank r (zeros: they add exactly nothing):

    a:  [n * r, in]    part j's A in rows j*r .. j*r + r_j
    bt: [n * r, out]   part j's (B * scaling)^T in the same rows, in its own output
                       columns only (zeros elsewhere)

so `(x @ a.T) @ bt` is every targeted part's delta, each landing in its own output rows.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from pinnace.runtime.lora.request import LoRARequest
from pinnace.runtime.lora.targets import LoRAModelSpec, TargetModule

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# base_model.model.<module>.<kind>[.weight]; <module> ends in the PEFT module name.
_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_\w+?)(?:\.weight)?$")
_LAYER_MODULE = re.compile(
    r"^(?:model\.)?layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<part>\w+)$"
)


@dataclass
class LoRAAdapter:
    """One adapter's weights in host memory, in the base model's dtype.

    weights[(layer, module path)] = (a [k, in], bt [k, out]); see the module docstring.
    """

    name: str
    rank: int  # the largest rank of any module
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)

    @property
    def num_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


@dataclass(frozen=True)
class PeftLoRAConfig:
    """The fields of a PEFT `LoraConfig` that decide the math."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    def rank_for(self, module_name: str) -> int:
        return int(self.rank_pattern.get(_pattern_key(self.rank_pattern, module_name), self.r))

    def scaling_for(self, module_name: str) -> float:
        key = _pattern_key(self.alpha_pattern, module_name)
        alpha = float(self.alpha_pattern.get(key, self.lora_alpha))
        rank = self.rank_for(module_name)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str:
    """PEFT's `get_pattern_key`: the first pattern that matches the module name's tail."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return module_name


def load_adapter(
    request: LoRARequest, spec: LoRAModelSpec, max_lora_rank: int, dtype: torch.dtype
) -> LoRAAdapter:
    """Read and check a PEFT folder against the base model; ValueError says what is wrong.

    FileNotFoundError when the folder or its files are missing. Safe to call from any
    thread: it only reads files and `spec`.
    """
    folder = request.lora_path
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"No adapter found for {folder}: not a folder.")
    where = f"LoRA adapter {request.lora_name!r} ({folder})"
    config = read_peft_config(folder, where, spec)
    tensors = _read_tensors(folder, where)
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        layer, part, kind = _parse_key(key, spec, where)
        found.setdefault((layer, part), {})[kind] = tensor
    if not found:
        raise ValueError(f"{where} holds no LoRA weights.")
    packed: dict[tuple[int, str], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    max_rank = 0
    for (layer, part), pair in sorted(found.items()):
        module, index = spec.locate(part)
        name = f"model.layers.{layer}.{module.path.split('.')[0]}.{part}"
        a, b = _checked_pair(pair, name, module, index, config, max_lora_rank, where)
        max_rank = max(max_rank, a.shape[0])
        scaled_b = b.float() * config.scaling_for(name)
        packed.setdefault((layer, module.path), []).append((index, a.float(), scaled_b))
    weights = {
        (layer, path): _pack(spec.module(path), parts, dtype)
        for (layer, path), parts in packed.items()
    }
    return LoRAAdapter(request.lora_name, max_rank, weights)


def read_peft_config(folder: str, where: str, spec: LoRAModelSpec) -> PeftLoRAConfig:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No adapter found for {folder}: it has no {CONFIG_FILE}.")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: {CONFIG_FILE} is not valid JSON ({exc}).") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: {CONFIG_FILE} must hold a JSON object.")
    _check_supported_options(raw, where, spec)
    r, alpha = raw.get("r"), raw.get("lora_alpha", raw.get("r"))
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{where}: {CONFIG_FILE} needs a positive integer r, got {r!r}.")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ValueError(f"{where}: lora_alpha must be a number, got {alpha!r}.")
    return PeftLoRAConfig(
        r=r,
        lora_alpha=float(alpha),
        use_rslora=bool(raw.get("use_rslora", False)),
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
    )


def _check_supported_options(raw: dict[str, Any], where: str, spec: LoRAModelSpec) -> None:
    """Options that change the math in ways the batched forward does not implement."""
    kind = raw.get("peft_type", "LORA")
    if kind != "LORA":
        raise ValueError(f"{where} is a {kind} adapter; only LORA adapters are supported.")
    refused = {
        "use_dora": "DoRA adapters",
        "lora_bias": "LoRA biases (lora_bias)",
        "use_qalora": "QA-LoRA adapters",
        "modules_to_save": "fully trained extra modules (modules_to_save)",
        "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
        "layer_replication": "layer_replication",
        "target_parameters": "target_parameters",
    }
    for option, what in refused.items():
        if raw.get(option):
            raise ValueError(f"{where} uses {what}, which LoRA serving does not support.")
    if raw.get("bias", "none") != "none":
        raise ValueError(f"{where} trains biases (bias={raw['bias']!r}); only 'none' is supported.")
    targets = raw.get("target_modules")
    if isinstance(targets, list):
        bad = sorted({str(t).rsplit(".", 1)[-1] for t in targets} - set(spec.supported_targets))
        if bad:
            raise ValueError(_unsupported(where, ", ".join(bad), spec))


def _read_tensors(folder: str, where: str) -> dict[str, torch.Tensor]:
    path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(path):
        hint = ""
        if os.path.isfile(os.path.join(folder, "adapter_model.bin")):
            hint = " (adapter_model.bin is not read: save with safe_serialization=True)"
        raise FileNotFoundError(f"No adapter found for {folder}: it has no {WEIGHTS_FILE}{hint}.")
    try:
        with safe_open(path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{where}: {WEIGHTS_FILE} cannot be read ({exc}).") from exc


def _parse_key(key: str, spec: LoRAModelSpec, where: str) -> tuple[int, str, str]:
    """(layer, PEFT module name, "A" or "B") of one tensor name."""
    match = _TENSOR.match(key)
    if match is None:
        raise ValueError(f"{where}: tensor {key!r} is not a LoRA weight.")
    module = match["module"]
    target = module.rsplit(".", 1)[-1]
    if target not in spec.supported_targets:
        raise ValueError(_unsupported(where, f"{target} ({key!r})", spec))
    if match["kind"] not in ("lora_A", "lora_B"):
        raise ValueError(f"{where}: tensor {key!r} ({match['kind']}) is not supported.")
    layer_match = _LAYER_MODULE.match(module)
    if layer_match is None:
        raise ValueError(f"{where}: tensor {key!r} is not in a decoder layer of this model.")
    layer = int(layer_match["layer"])
    if layer >= spec.num_layers:
        raise ValueError(
            f"{where}: tensor {key!r} is for layer {layer}, but the base model has "
            f"{spec.num_layers} layers."
        )
    return layer, target, match["kind"][-1]


def _unsupported(where: str, what: str, spec: LoRAModelSpec) -> str:
    return (
        f"{where} targets {what}; LoRA serving supports only "
        f"{', '.join(spec.supported_targets)} on {spec.architecture}."
    )


def _checked_pair(
    pair: dict[str, torch.Tensor],
    name: str,
    module: TargetModule,
    index: int,
    config: PeftLoRAConfig,
    max_lora_rank: int,
    where: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if set(pair) != {"A", "B"}:
        missing = "lora_B" if "A" in pair else "lora_A"
        raise ValueError(f"{where}: {name} has no {missing} weight.")
    a, b = pair["A"], pair["B"]
    rank = config.rank_for(name)
    if rank > max_lora_rank:
        raise ValueError(
            f"{where} has rank {rank} (at {name}), above max_lora_rank={max_lora_rank}; "
            "start the engine with a larger max_lora_rank (--max-lora-rank)."
        )
    out = module.out_sizes[index]
    expected_a, expected_b = (rank, module.in_features), (out, rank)
    if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
        raise ValueError(
            f"{where} does not fit this base model at {name}: lora_A is {tuple(a.shape)} "
            f"and lora_B {tuple(b.shape)}, expected {expected_a} and {expected_b} "
            f"(rank {rank}, {module.in_features} -> {out})."
        )
    if not (a.is_floating_point() and b.is_floating_point()):
        raise ValueError(f"{where}: {name} weights must be floating point, got {a.dtype}.")
    return a, b


def _pack(
    module: TargetModule, parts: list[tuple[int, torch.Tensor, torch.Tensor]], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the targeted parts of one module (see the module docstring); float32 in."""
    rank = max(a.shape[0] for _, a, _ in parts)
    a_packed = torch.zeros(len(parts) * rank, module.in_features)
    bt_packed = torch.zeros(len(parts) * rank, module.out_features)
    for j, (index, a, b) in enumerate(sorted(parts, key=lambda p: p[0])):
        r = a.shape[0]
        a_packed[j * rank : j * rank + r] = a
        bt_packed[j * rank : j * rank + r, module.rows(index)] = b.T
    return a_packed.to(dtype).contiguous(), bt_packed.to(dtype).contiguous()
