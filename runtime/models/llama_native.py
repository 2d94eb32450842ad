"""Decode steps of a Llama stack in one native call (kernels/llama_decode.c).

At batch 1 the model's PyTorch ops and module calls cost a third of a bf16 decode step on
CPU besides streaming the weights; for steps of at most the GEMV's MAX_ROWS tokens (decode
rows, a speculative verification's few tokens of one request, a short prompt chunk)
`NativeLlamaDecode` runs every layer with one ctypes call over the
same weights, KV cache and kernels. It applies where the stack is plain Llama arithmetic:
exactly LlamaDecoderLayer / LlamaAttention (no q/k norm, no soft-capping) / LlamaMLP with
SiLU, native RMSNorm, bf16 linears with the GEMV or int8 ones with the int8 GEMV (then at
most its MAX_ROWS rows), one rotary table without LongRoPE offsets, no module hooks (tensor
parallelism's all-reduce), and the CPU attention backend reading a bf16 cache. Every other
step (longer prefills, larger batches, LoRA, other architectures' layers) takes the module path.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.activations import SiLUActivation

from pinnace.runtime.kernels import llama_decode as kernels
from pinnace.runtime.kernels.bf16_gemv import MAX_ROWS
from pinnace.runtime.kernels.int8_gemv import MAX_ROWS as INT8_MAX_ROWS
from pinnace.runtime.kernels.paged_attention import supports
from pinnace.runtime.layers.attention.cpu_backend import CPUDecodeAttentionBackend
from pinnace.runtime.layers.forward_context import ForwardContext
from pinnace.runtime.layers.linear import PackedLinear
from pinnace.runtime.layers.norm import RMSNorm
from pinnace.runtime.layers.quantization.int8 import Int8Linear
from pinnace.runtime.layers.rotary import RotaryEmbedding


@dataclass
class _Geometry:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    max_rows: int = MAX_ROWS  # the int8 GEMV's limit when a layer is int8


class NativeLlamaDecode:
    """`run(ctx, positions, hidden)` -> whether it ran (hidden then updated in place)."""

    enabled = True  # benchmarks turn it off for the module path's before/after

    def __init__(
        self,
        kernel: kernels.LlamaDecodeKernel,
        layers: list[Any],  # LlamaDecoderLayer (checked by create)
        rotary: RotaryEmbedding,
        geometry: _Geometry,
    ) -> None:
        self.kernel, self.layers, self.rotary, self.geometry = kernel, layers, rotary, geometry
        self._first_qkv = layers[0].self_attn.qkv_proj  # LoRA swaps it: then never again
        self._model: kernels.Model | None = None
        self._block_size = 0
        self._caches: list[torch.Tensor] | None = None
        self._layer_structs: ctypes.Array[kernels.Layer] | None = None
        self._scratch: torch.Tensor | None = None
        # Profiling (hack/bench/step_profile.py): seconds per kernels.PARTS when set.
        self.timings: ctypes.Array[ctypes.c_double] | None = None

    @classmethod
    def create(cls, layers: list[nn.Module], embed_scale: float | None) -> NativeLlamaDecode | None:
        """The native path for these layers, or None where it does not apply."""
        kernel = kernels.llama_decode()
        if kernel is None or not cls.enabled or not layers or embed_scale is not None:
            return None
        geometry = _plain_llama_geometry(layers, kernel.has_int8)
        if geometry is None:
            return None
        first: Any = layers[0]
        rotary: RotaryEmbedding = first.self_attn.rotary[0]
        if rotary.long_rope_from is not None or rotary.cos.dtype != torch.float32:
            return None
        return cls(kernel, layers, rotary, geometry)

    def run(
        self, ctx: ForwardContext | None, positions: torch.Tensor, hidden: torch.Tensor
    ) -> bool:
        if ctx is None:
            return False  # outside a step: no cache to attend to
        meta: Any = ctx.attn_metadata
        if (
            hidden.shape[0] > self.geometry.max_rows
            or hidden.dtype != torch.bfloat16
            or hidden.device.type != "cpu"
            or not isinstance(ctx.backend, CPUDecodeAttentionBackend)
            or ctx.rope_offsets is not None
            or not hasattr(meta, "q_gather")
            or meta.block_tables.dtype != torch.int64
            or not meta.block_tables.is_contiguous()
            or self.layers[0].self_attn.qkv_proj is not self._first_qkv
            or not self._bind(ctx.kv_caches, meta.block_size)
        ):
            return False
        assert self._model is not None and self._layer_structs is not None
        assert self._scratch is not None
        tables, seq_lens = meta.block_tables, meta.seq_lens
        if meta.q_gather is not None:
            # Several query tokens of a request (a speculative verification step, a short
            # prompt chunk): one kernel row per token, attending causally up to its own
            # position. The kernel writes every row's K/V of a layer before any row
            # attends, so a token sees the ones before it in the same step.
            # Its length is its index in the table (computed + j), which the draft's
            # catch-up (tables from the first kept block) keeps apart from its position.
            tables = tables.index_select(0, meta.q_scatter // meta.max_q)
            seq_lens = meta.q_pos.reshape(-1).index_select(0, meta.q_scatter) + 1
        self.kernel.run(
            self._model,
            self._layer_structs,
            hidden,
            positions,
            meta.write_rows,
            tables,
            seq_lens,
            self._scratch,
            self.timings,
        )
        return True

    def _bind(self, caches: list[torch.Tensor], block_size: int) -> bool:
        """Builds the C structs for these caches once (their addresses never change)."""
        if caches is self._caches and block_size == self._block_size:
            return True
        g = self.geometry
        # Only these layers' caches (a pipeline stage's; the others' are empty).
        own = [caches[x.self_attn.attn.layer_idx] for x in self.layers]
        if own[0].dim() != 5:
            return False
        shape = (2, own[0].shape[1], g.kv_heads, block_size, g.head_dim)
        if any(c.dtype != torch.bfloat16 or c.shape != shape for c in own):
            return False  # fp8 KV, another backend's layout
        if not all(c.is_contiguous() for c in own):
            return False
        rot = self.rotary
        self._model = self.kernel.model(
            g.hidden, g.heads, g.kv_heads, g.head_dim, g.intermediate, block_size, g.eps,
            rot.cos, rot.sin,
        )  # fmt: skip
        structs = [_layer_struct(x, c) for x, c in zip(self.layers, own, strict=True)]
        self._layer_structs = (kernels.Layer * len(structs))(*structs)
        self._scratch = self.kernel.scratch(self._model, MAX_ROWS)
        self._caches, self._block_size = caches, block_size
        return True


def _layer_struct(layer: Any, cache: torch.Tensor) -> kernels.Layer:
    attn, mlp, ptr = layer.self_attn, layer.mlp, kernels.ptr
    return kernels.Layer(
        ptr(layer.input_layernorm.weight), ptr(layer.post_attention_layernorm.weight),
        _linear_struct(attn.qkv_proj), _linear_struct(attn.o_proj),
        _linear_struct(mlp.gate_up_proj), _linear_struct(mlp.down_proj),
        ptr(cache[0]), ptr(cache[1]), attn.attn.scale, attn.attn.sliding_window or 0,
    )  # fmt: skip


def _linear_struct(linear: Any) -> kernels.Linear:
    ptr = kernels.ptr
    if isinstance(linear, PackedLinear):
        return kernels.Linear(ptr(linear.plain), ptr(linear.bias), None, None)
    return kernels.Linear(
        ptr(linear.weight), ptr(linear.bias), ptr(linear.scale_f32), ptr(linear.rowsum)
    )


def _plain_llama_geometry(layers: list[Any], int8: bool) -> _Geometry | None:
    """The shared geometry when every layer is plain Llama arithmetic on native kernels
    (int8 linears too when `int8`)."""
    from pinnace.runtime.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP

    first = layers[0]
    if type(first) is not LlamaDecoderLayer or type(first.self_attn) is not LlamaAttention:
        return None
    a = first.self_attn
    geometry = _Geometry(
        hidden=first.input_layernorm.weight.shape[0],
        heads=a.num_heads,
        kv_heads=a.num_kv_heads,
        head_dim=a.head_dim,
        intermediate=getattr(first.mlp, "intermediate_size", 0),
        eps=first.input_layernorm.eps if isinstance(first.input_layernorm, RMSNorm) else 0.0,
    )
    if not supports(a.num_heads, a.num_kv_heads, a.head_dim) or a.head_dim > kernels.MAX_HEAD_DIM:
        return None
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        if (
            type(layer) is not LlamaDecoderLayer
            or type(attn) is not LlamaAttention
            or type(mlp) is not LlamaMLP
            or attn.q_norm is not None
            or attn.attn.softcap is not None
            or attn.rotary[0] is not a.rotary[0]
            or (attn.num_heads, attn.num_kv_heads, attn.head_dim)
            != (geometry.heads, geometry.kv_heads, geometry.head_dim)
            or mlp.intermediate_size != geometry.intermediate
            or type(mlp.act) not in (SiLUActivation, nn.SiLU)
        ):
            return None
        # Tensor parallelism's collectives (and profilers) hook modules: one call skips them.
        if any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules()):
            return None
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if not all(_native_norm(n, geometry.eps) for n in norms):
            return None
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if not all(_gemv_linear(lin) or (int8 and _int8_linear(lin)) for lin in linears):
            return None
        if any(type(lin) is Int8Linear for lin in linears):
            geometry.max_rows = min(geometry.max_rows, INT8_MAX_ROWS)
    return geometry


def _native_norm(norm: Any, eps: float) -> bool:
    return (
        type(norm) is RMSNorm
        and norm.native is not None
        and norm.eps == eps
        and norm.weight.dtype == torch.bfloat16
        and norm.weight.is_contiguous()
    )


def _int8_linear(linear: Any) -> bool:
    return (
        type(linear) is Int8Linear
        and linear.native is not None
        and linear.scale_f32 is not None
        and linear.rowsum is not None
        and linear.weight.is_contiguous()
        and (linear.bias is None or linear.bias.dtype == torch.bfloat16)
    )


def _gemv_linear(linear: Any) -> bool:
    return (
        type(linear) is PackedLinear
        and linear.gemv is not None
        and linear.plain is not None
        and linear.plain.dtype == torch.bfloat16
        and linear.plain.is_contiguous()
        and (linear.bias is None or linear.bias.dtype == torch.bfloat16)
    )
