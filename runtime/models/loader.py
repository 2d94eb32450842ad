"""Open a checkpoint (HF folder with safetensors, or a GGUF file) and build the model."""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from pinnace.runtime.layers.linear import can_pack, pack_linears
from pinnace.runtime.models.registry import resolve_model_class
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

WeightIterator = Iterator[tuple[str, torch.Tensor]]


@dataclass
class Checkpoint:
    """Everything needed to build a model, before any weight is read."""

    path: str
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: list[int]
    weights: Callable[[torch.dtype], WeightIterator]  # HF-named tensors, lazily
    checkpoint_dtype: torch.dtype | None  # as stored (None: quantized / unknown)
    format: str  # "safetensors" or "gguf"


def open_checkpoint(path: str, chat_template: str | None = None) -> Checkpoint:
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist (no hub downloads here).")
    ckpt = _open_gguf(path) if _is_gguf(path) else _open_hf_folder(path)
    if chat_template is not None:
        ckpt.tokenizer.chat_template = chat_template
    return ckpt


def _is_gguf(path: str) -> bool:
    if os.path.isfile(path):
        return path.endswith(".gguf")
    return bool(glob.glob(os.path.join(path, "*.gguf"))) and not glob.glob(
        os.path.join(path, "*.safetensors")
    )


def _open_gguf(path: str) -> Checkpoint:
    from pinnace.runtime.models.gguf_loader import load_gguf

    gguf = load_gguf(path)
    return Checkpoint(
        path=path,
        config=gguf.config,
        tokenizer=gguf.tokenizer,
        eos_token_ids=list(gguf.generation_eos_token_ids),
        weights=gguf.weights,
        checkpoint_dtype=None,
        format="gguf",
    )


def _open_hf_folder(path: str) -> Checkpoint:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} has no config.json: not a Hugging Face model folder.")
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    files = _safetensors_files(path)
    return Checkpoint(
        path=path,
        config=config,
        tokenizer=tokenizer,
        eos_token_ids=_eos_token_ids(path, config, tokenizer),
        weights=lambda dtype: _iter_safetensors(files, dtype),
        checkpoint_dtype=getattr(config, "dtype", None) or getattr(config, "torch_dtype", None),
        format="safetensors",
    )


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, s) for s in shards]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"shards listed in {index} are missing: {missing}")
        return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path!r}.")
    return files


def _iter_safetensors(files: list[str], dtype: torch.dtype) -> WeightIterator:
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name).to(dtype)


def _eos_token_ids(
    path: str, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase
) -> list[int]:
    """EOS ids to stop on: generation_config.json first (it may list several)."""
    candidates: object = None
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            candidates = json.load(f).get("eos_token_id")
    if candidates is None:
        candidates = getattr(config, "eos_token_id", None)
    if candidates is None:
        candidates = tokenizer.eos_token_id
    if candidates is None:
        return []
    values: list = candidates if isinstance(candidates, list) else [candidates]
    return [int(c) for c in values]


def resolve_dtype(dtype: str | torch.dtype, ckpt: Checkpoint, device: torch.device) -> torch.dtype:
    """ "auto": the checkpoint's dtype (bfloat16 when unknown); float16 becomes bfloat16 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    names.update({"float": torch.float32, "half": torch.float16})
    if dtype in names:
        return names[dtype]
    if dtype != "auto":
        raise ValueError(f"dtype {dtype!r} is not one of auto, float32, bfloat16, float16.")
    stored = ckpt.checkpoint_dtype
    if isinstance(stored, str):
        stored = names.get(stored)
    if not isinstance(stored, torch.dtype) or stored not in names.values():
        stored = torch.bfloat16
    if stored == torch.float16 and device.type == "cpu":
        return torch.bfloat16
    return stored


def build_model(
    ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, max_positions: int
) -> nn.Module:
    """Construct on the meta device (no random init), materialise, then stream weights in."""
    cls = resolve_model_class(getattr(ckpt.config, "architectures", None))
    with torch.device("meta"):
        model = cls(ckpt.config, max_positions)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.rotary.build_tables(device)  # type: ignore[operator, union-attr]
    model.tie_weights()  # type: ignore[operator]
    weights = tqdm(ckpt.weights(dtype), desc="Loading weights", unit=" tensors", leave=False)
    loaded = model.load_weights(weights)  # type: ignore[operator]
    missing = model.expected_weights() - loaded  # type: ignore[operator]
    if missing:
        raise ValueError(f"checkpoint {ckpt.path!r} lacks weights: {sorted(missing)[:8]}")
    if can_pack(device, dtype):
        pack_linears(model)
    return model.eval()
