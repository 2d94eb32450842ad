"""The torch backend with decode steps read in place by a native CPU kernel.

Same KV layout and metadata as the torch backend (the kernel reads its head-major blocks,
kernels/paged_decode_attention.c); decode-only steps in bfloat16 on an AVX-512 CPU skip the
gather. Everything else (prefill chunks, soft-capped scores, other dtypes) is the torch
backend's.
"""

from __future__ import annotations

import torch

from pinnace.runtime.kernels.paged_attention import Attend, paged_decode_attention, supports
from pinnace.runtime.layers.attention.torch_backend import (
    TorchAttentionBackend,
    TorchAttentionMetadata,
)


class CPUDecodeAttentionBackend(TorchAttentionBackend):
    name = "torch+cpu-decode"

    def __init__(self, num_kv_heads: int, native: Attend) -> None:
        super().__init__(num_kv_heads)
        self.native = native

    @classmethod
    def create(cls, num_kv_heads: int) -> CPUDecodeAttentionBackend | None:
        """The backend, or None where the kernel does not build (no AVX-512, no compiler)."""
        native = paged_decode_attention()
        return None if native is None else cls(num_kv_heads, native)

    def _decode_in_place(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        m: TorchAttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor | None:
        head_dim = q.shape[2]
        if not (
            q.device.type == "cpu"
            and q.dtype == torch.bfloat16
            and kv_cache.dtype == torch.bfloat16
            and supports(q.shape[1], self.num_kv_heads, head_dim)
        ):
            return None
        rows = kv_cache.view(2, -1, m.block_size * head_dim)  # [K|V, block * Hkv + h, bs * D]
        return self.native(
            q, rows[0], rows[1], m.block_tables, m.seq_lens, self.num_kv_heads, m.block_size,
            scale, sliding_window,
        )  # fmt: skip
