"""Pooling a decoder's final hidden states into one embedding per prompt.

    last   the last token's state (decoder embedding models: e5-mistral, gte-Qwen2, ...)
    mean   the average over the prompt's tokens
    cls    the first token's state

then optionally L2-normalised. A sentence-transformers folder says which: `modules.json`
lists a Pooling module (its `config.json` names the mode) and a Normalize module when the
embeddings are unit vectors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

POOLING_METHODS = ("last", "mean", "cls")
# sentence-transformers' Pooling config key -> our method
_ST_MODES = {
    "pooling_mode_lasttoken": "last",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
}


@dataclass(frozen=True)
class PoolingConfig:
    method: str = "last"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.method not in POOLING_METHODS:
            raise ValueError(f"pooling {self.method!r} is not one of {', '.join(POOLING_METHODS)}.")


def has_pooling_config(path: str) -> bool:
    """True for a sentence-transformers folder: modules.json lists a Pooling module."""
    modules_file = os.path.join(path, "modules.json")
    if not os.path.isfile(modules_file):
        return False
    with open(modules_file) as f:
        modules = json.load(f)
    return any(str(m.get("type", "")).endswith("Pooling") for m in modules)


def pooling_from_folder(path: str) -> PoolingConfig:
    """The model folder's sentence-transformers pooling, else last-token + normalise."""
    modules_file = os.path.join(path, "modules.json")
    if not os.path.isfile(modules_file):
        return PoolingConfig()
    with open(modules_file) as f:
        modules = json.load(f)
    method, normalize = "last", False
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith("Pooling"):
            with open(os.path.join(path, module.get("path", ""), "config.json")) as f:
                modes = json.load(f)
            found = [ours for key, ours in _ST_MODES.items() if modes.get(key)]
            if not found:
                raise ValueError(f"{path}: unsupported sentence-transformers pooling {modes}.")
            method = found[0]
        elif kind.endswith("Normalize"):
            normalize = True
    return PoolingConfig(method, normalize)


def pool(hidden: torch.Tensor, query_lens: list[int], config: PoolingConfig) -> torch.Tensor:
    """hidden [T, H] of prompts laid end to end (query_lens tokens each) -> float32 [B, H]."""
    rows = []
    start = 0
    for n in query_lens:
        seq = hidden[start : start + n].float()
        if config.method == "last":
            rows.append(seq[-1])
        elif config.method == "cls":
            rows.append(seq[0])
        else:
            rows.append(seq.mean(dim=0))
        start += n
    out = torch.stack(rows)
    return F.normalize(out, dim=-1) if config.normalize else out
