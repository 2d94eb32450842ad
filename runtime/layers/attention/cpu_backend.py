"""The torch backend with decode rows read in place by a native CPU kernel.

Same KV layout as the torch backend (the kernel reads its head-major blocks,
kernels/paged_decode_attention.c). In bfloat16 on an AVX-512 CPU, decode-only steps skip the
gather, and mixed steps are split by rows (vLLM's CPU backend does the same): requests with
one query token go through the kernel, the others (prompt chunks, speculative verification)
through the torch backend's SDPA on a batch of only those requests, so decode rows are not
padded to the longest query nor their context gathered. Soft-capped scores, other dtypes and
fp8 KV stay on the torch backend's unsplit path.

Steps with short contexts (many short prompts at once) go through the kernel entirely, one
row per token attending up to its own position: per-token work is proportional to the keys
each token sees, while SDPA pays per padded (request, query, key) and a fixed cost per call
that dominates at a few keys (48 prompts of ~8 tokens: ~0.15 vs ~0.45 ms a layer). In bf16
the rotary and the K/V write of every step run in one native pass too (rope_write).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pinnace.runtime.kernels.paged_attention import (
    Attend,
    RopeAttend,
    RopeWrite,
    paged_decode_attention,
    rope_decode_attention,
    rope_supports,
    rope_write,
    supports,
)
from pinnace.runtime.layers.attention.backend import BatchLayout
from pinnace.runtime.layers.attention.fp8_kv import write_kv
from pinnace.runtime.layers.attention.torch_backend import (
    TorchAttentionBackend,
    TorchAttentionMetadata,
    TorchMetadataBuilder,
)


@dataclass
class MixedSplit:
    """A step with both decode rows and longer queries, as two sub-batches."""

    decode_rows: torch.Tensor  # [Bd] flat token row of each one-token request
    decode_block_tables: torch.Tensor  # [Bd, n_blk] int64
    decode_seq_lens: torch.Tensor  # [Bd] int64
    other_rows: torch.Tensor  # flat token rows of the other requests, in order
    other: TorchAttentionMetadata  # the torch backend's metadata for those requests alone


@dataclass
class PerToken:
    """A step attended by the kernel with one row per token (each token's own request's
    blocks, keys up to its own position; the step's K/V are all written first)."""

    block_tables: torch.Tensor  # [T, n_blk] int64
    seq_lens: torch.Tensor  # [T] int64, position + 1


@dataclass
class CPUAttentionMetadata(TorchAttentionMetadata):
    split: MixedSplit | None = None  # set for mixed steps
    per_token: PerToken | None = None  # set where it is cheaper than SDPA (see per_token_pays)


def per_token_pays(layout: BatchLayout) -> bool:
    """Whether a step with longer queries (at least one) is cheaper through the kernel
    row by row than through SDPA. The kernel's cost is ~ the keys all tokens see (~50 ns
    per token-key at 9 heads, 2 threads); SDPA's ~ its padded [B, max_q, L] score grid
    (~11 ns per entry with a mask) plus ~0.2 ms a call. Measured on the SmolLM2 shape
    (48 x ~8-token prompts: kernel 0.15, SDPA 0.38-0.46 ms; one 2048-token prompt:
    kernel 108, SDPA 48 ms)."""
    # Only the requests with longer queries: decode rows go to the kernel either way (the
    # split), so they would tip a step with a long prompt chunk towards the kernel.
    longer = [
        (q, c) for q, c in zip(layout.query_lens, layout.num_computed_tokens, strict=True) if q > 1
    ]
    work = sum(q * c + q * (q + 1) // 2 for q, c in longer)
    grid = len(longer) * max(q for q, _ in longer) * max(q + c for q, c in longer)
    return 4 * work <= grid + 16384


class CPUMetadataBuilder(TorchMetadataBuilder):
    def __init__(self, num_kv_heads: int, split_mixed: bool = True, per_token: bool = True) -> None:
        super().__init__(num_kv_heads)
        self.split_mixed = split_mixed
        self.per_token = per_token

    def build(self, layout: BatchLayout, graph_bucket: int | None = None) -> CPUAttentionMetadata:
        m = super().build(layout, graph_bucket)
        meta = CPUAttentionMetadata(**{f: getattr(m, f) for f in m.__dataclass_fields__})
        lens = layout.query_lens
        if max(lens) > 1 and self.per_token and per_token_pays(layout):
            meta.per_token = self._per_token(layout, meta)
        elif self.split_mixed and 1 in lens and max(lens) > 1:
            meta.split = self._split(layout, meta)
        return meta

    def _per_token(self, layout: BatchLayout, m: TorchAttentionMetadata) -> PerToken:
        lens = torch.tensor(layout.query_lens)
        owner = torch.repeat_interleave(torch.arange(len(lens)), lens)  # [T] request of a row
        starts = torch.cumsum(lens, 0) - lens
        computed = torch.tensor(layout.num_computed_tokens, dtype=torch.long)
        seq_lens = computed[owner] + torch.arange(owner.shape[0]) - starts[owner] + 1
        dev = m.block_tables.device
        return PerToken(
            block_tables=m.block_tables.index_select(0, owner.to(dev)).contiguous(),
            seq_lens=seq_lens.to(dev),
        )

    def _split(self, layout: BatchLayout, m: TorchAttentionMetadata) -> MixedSplit:
        starts = [0]
        for n in layout.query_lens:
            starts.append(starts[-1] + n)
        dec = [b for b, n in enumerate(layout.query_lens) if n == 1]
        rest = [b for b, n in enumerate(layout.query_lens) if n != 1]
        other_rows = [r for b in rest for r in range(starts[b], starts[b + 1])]
        other_idx = torch.tensor(other_rows, dtype=torch.long)
        sub = BatchLayout(
            query_lens=[layout.query_lens[b] for b in rest],
            num_computed_tokens=[layout.num_computed_tokens[b] for b in rest],
            block_tables=[layout.block_tables[b] for b in rest],
            block_size=layout.block_size,
            slot_mapping=layout.slot_mapping.cpu()[other_idx],
            device=layout.device,
            block_table_cpu=(
                None if layout.block_table_cpu is None else layout.block_table_cpu[rest]
            ),
        )
        dev, dec_idx = layout.device, torch.tensor(dec, device=m.block_tables.device)
        return MixedSplit(
            decode_rows=torch.tensor([starts[b] for b in dec], device=dev),
            decode_block_tables=m.block_tables[dec_idx].contiguous(),
            decode_seq_lens=m.seq_lens[dec_idx].contiguous(),
            other_rows=other_idx.to(dev),
            other=super().build(sub),
        )


class CPUDecodeAttentionBackend(TorchAttentionBackend):
    name = "torch+cpu-decode"

    def __init__(
        self,
        num_kv_heads: int,
        native: Attend,
        split_mixed: bool = True,
        rope_native: RopeAttend | None = None,
        rope_write: RopeWrite | None = None,
        per_token: bool = True,
    ) -> None:
        super().__init__(num_kv_heads)
        self.native = native
        self.rope_native = rope_native
        self.rope_write = rope_write
        self.builder = CPUMetadataBuilder(num_kv_heads, split_mixed, per_token)

    @classmethod
    def create(cls, num_kv_heads: int) -> CPUDecodeAttentionBackend | None:
        """The backend, or None where the kernel does not build (no AVX-512, no compiler)."""
        native = paged_decode_attention()
        if native is None:
            return None
        return cls(
            num_kv_heads, native, rope_native=rope_decode_attention(), rope_write=rope_write()
        )

    def rope_decode(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: TorchAttentionMetadata,
        num_heads: int,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor | None:
        """bf16 steps: rotary + K/V write in one native pass (about ten PyTorch ops and
        their dispatch per layer otherwise; bit-equal q/k and cache), then attention; for
        decode-only steps all three in one call."""
        head_dim = cos.shape[-1]
        native = self.rope_native if metadata.is_decode else self.rope_write
        if (
            native is None
            or qkv.device.type != "cpu"
            or qkv.dtype != torch.bfloat16
            or kv_cache.dtype != torch.bfloat16
            or cos.dtype != torch.float32
            or not rope_supports(num_heads, self.num_kv_heads, head_dim)
            or positions.dtype != torch.int64
            or not positions.is_contiguous()
        ):
            return None
        rows = kv_cache.view(2, -1, metadata.block_size * head_dim)
        if not metadata.is_decode:
            assert self.rope_write is not None
            q = self.rope_write(
                qkv, positions, cos, sin, metadata.write_rows, rows[0], rows[1], num_heads,
                self.num_kv_heads,
            )  # fmt: skip
            return self._attend_written(q, kv_cache, metadata, scale, sliding_window)
        assert self.rope_native is not None
        return self.rope_native(
            qkv, positions, cos, sin, metadata.write_rows, rows[0], rows[1],
            metadata.block_tables, metadata.seq_lens, num_heads, self.num_kv_heads,
            metadata.block_size, scale, sliding_window,
        )  # fmt: skip

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: TorchAttentionMetadata,
        scale: float,
        sliding_window: int | None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        if softcap is not None or not self._kernel_reads(q, kv_cache):
            return super().forward(q, k, v, kv_cache, metadata, scale, sliding_window, softcap)
        head_dim = k.shape[-1]
        # Every row's K/V first (prompt rows may read blocks that decode rows fill).
        write_kv(kv_cache[0].view(-1, head_dim), metadata.write_rows, k.reshape(-1, head_dim))
        write_kv(kv_cache[1].view(-1, head_dim), metadata.write_rows, v.reshape(-1, head_dim))
        return self._attend_written(q, kv_cache, metadata, scale, sliding_window)

    def _attend_written(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: TorchAttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """Attention of a step whose K/V are in the cache (q rotated; no soft-capping)."""
        per_token = getattr(metadata, "per_token", None)
        if per_token is not None:
            return self._native_decode(
                q, kv_cache, per_token.block_tables, per_token.seq_lens, metadata.block_size,
                scale, sliding_window,
            )  # fmt: skip
        s = getattr(metadata, "split", None)
        if s is None:
            return self._attend(q, kv_cache, metadata, scale, sliding_window, None)
        out = torch.empty_like(q)
        out[s.decode_rows] = self._native_decode(
            q[s.decode_rows], kv_cache, s.decode_block_tables, s.decode_seq_lens,
            metadata.block_size, scale, sliding_window,
        )  # fmt: skip
        out[s.other_rows] = self._attend(
            q[s.other_rows], kv_cache, s.other, scale, sliding_window, None
        )
        return out

    def _kernel_reads(self, q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        return (
            q.device.type == "cpu"
            and q.dtype == torch.bfloat16
            and kv_cache.dtype == torch.bfloat16
            and supports(q.shape[1], self.num_kv_heads, q.shape[2])
        )

    def _native_decode(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        block_size: int,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        rows = kv_cache.view(2, -1, block_size * q.shape[2])  # [K|V, block * Hkv + h, bs * D]
        return self.native(
            q, rows[0], rows[1], block_tables, seq_lens, self.num_kv_heads, block_size,
            scale, sliding_window,
        )  # fmt: skip

    def _decode_in_place(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        m: TorchAttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor | None:
        if not self._kernel_reads(q, kv_cache):
            return None
        return self._native_decode(
            q, kv_cache, m.block_tables, m.seq_lens, m.block_size, scale, sliding_window
        )
