"""Attention backends: how a step's queries read the paged KV cache.

A backend turns the step's batch layout into its own metadata once per step, and per
layer writes the step's K/V into the cache and then attends. Invariant every backend
keeps: all of a layer's K/V writes for the step land before any query of the step reads,
so a request may reuse blocks another request fills in the same step (prefix hits).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class BatchLayout:
    """Per-step batch description shared by all backends (host-side lists + device tensors).

    How a layer's K/V tensor is laid out inside is the backend's own business; slots and
    block ids are the shared vocabulary.

    Tokens of all requests are flattened: request b owns rows
    query_start_loc[b] : query_start_loc[b + 1] of q/k/v.
    """

    query_lens: list[int]
    num_computed_tokens: list[int]  # KV already in the cache before this step
    block_tables: list[list[int]]
    block_size: int
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    device: torch.device

    @property
    def seq_lens(self) -> list[int]:
        return [c + q for c, q in zip(self.num_computed_tokens, self.query_lens, strict=True)]


class AttentionBackend(ABC):
    name: str

    @abstractmethod
    def build_metadata(self, layout: BatchLayout) -> Any: ...

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor,  # [2, num_slots, Hkv, D]
        metadata: Any,
        scale: float,
        sliding_window: int | None,
        softcap: float | None = None,  # scores -> softcap * tanh(scores / softcap)
    ) -> torch.Tensor:  # [T, H, D]
        ...


def get_attention_backend(name: str, device: torch.device, num_kv_heads: int) -> AttentionBackend:
    """Pick a backend by name. Only the portable torch backend exists so far; "auto" is
    where a FlashInfer backend on CUDA will be preferred once it lands."""
    from pinnace.runtime.layers.torch_attention import TorchAttentionBackend

    if name in ("auto", "torch"):
        return TorchAttentionBackend(num_kv_heads)
    raise ValueError(f"unknown attention backend {name!r}; supported: auto, torch.")
