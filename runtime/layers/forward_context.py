"""The scoped per-forward state that attention layers read: metadata and the KV cache.

Set once per step by the model runner with `forward_context(...)`, so `forward()`
signatures stay those of the HF architecture and no bare global leaks across steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from pinnace.runtime.layers.attention.backend import AttentionBackend


@dataclass
class ForwardContext:
    backend: AttentionBackend
    attn_metadata: Any  # the backend's own metadata type
    kv_caches: list[torch.Tensor]  # per layer: the backend's kv_cache_shape(...)
    # [T] row offsets into the rotary tables, added to the positions (None: all zero). A
    # request whose prompt crosses LongRoPE's switch rotates every token with the long
    # factors, as transformers' one-forward prefill does (RotaryEmbedding.table_offset).
    rope_offsets: torch.Tensor | None = None
    # What layers compute once per forward and share (rotary cos/sin rows of the step's
    # positions); dropped with the context, so nothing leaks into the next forward.
    step_cache: dict[Any, Any] = field(default_factory=dict)


_CONTEXT: ContextVar[ForwardContext | None] = ContextVar("pinnace_forward_context", default=None)


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[None]:
    token = _CONTEXT.set(ctx)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_forward_context() -> ForwardContext | None:
    """The step's context; None outside a forward (then no attention can run either)."""
    return _CONTEXT.get()


def current_rope_offsets() -> torch.Tensor | None:
    """The step's rotary table offsets; None outside a forward or when all are zero."""
    ctx = _CONTEXT.get()
    return None if ctx is None else ctx.rope_offsets


def current_step_cache() -> dict[Any, Any] | None:
    """The forward's scratch for values shared by its layers; None outside a forward."""
    ctx = _CONTEXT.get()
    return None if ctx is None else ctx.step_cache


def get_forward_context() -> ForwardContext:
    ctx = _CONTEXT.get()
    if ctx is None:
        raise RuntimeError("attention called outside forward_context(); use the ModelRunner")
    return ctx
