"""The scoped per-forward state that attention layers read: metadata and the KV cache.

Set once per step by the model runner with `forward_context(...)`, so `forward()`
signatures stay those of the HF architecture and no bare global leaks across steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from pinnace.runtime.layers.attention_backend import AttentionBackend


@dataclass
class ForwardContext:
    backend: AttentionBackend
    attn_metadata: Any  # the backend's own metadata type
    kv_caches: list[torch.Tensor]  # per layer: [2, num_slots, num_kv_heads, head_dim]


_CONTEXT: ContextVar[ForwardContext | None] = ContextVar("pinnace_forward_context", default=None)


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[None]:
    token = _CONTEXT.set(ctx)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def get_forward_context() -> ForwardContext:
    ctx = _CONTEXT.get()
    if ctx is None:
        raise RuntimeError("attention called outside forward_context(); use the ModelRunner")
    return ctx
