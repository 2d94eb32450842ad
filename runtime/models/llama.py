"""Llama, and the decoder building blocks the other Llama-like architectures reuse.

Our modules mirror HF's names except that q/k/v and gate/up are packed into one matmul
each (`qkv_proj`, `gate_up_proj`); the class's `packed_modules_mapping` says so, and
`load_weights` (models/base.py) maps HF's separate tensors into them.
Every forward works on the step's flattened tokens: hidden states are [T, hidden].
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN, SiLUActivation

from pinnace.runtime.distributed.pipeline_parallel import PPMissingLayer, Stage
from pinnace.runtime.kernels.llama_decode import silu_and_mul
from pinnace.runtime.layers.attention import Attention
from pinnace.runtime.layers.forward_context import current_forward_context
from pinnace.runtime.layers.norm import RMSNorm
from pinnace.runtime.layers.packed import PackedMapping
from pinnace.runtime.layers.rotary import RotaryEmbedding
from pinnace.runtime.models.base import CausalLMBase
from pinnace.runtime.models.llama_native import NativeLlamaDecode


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        layer_idx: int,
        rotary: RotaryEmbedding,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool = False,
        sliding_window: int | None = None,
        *,
        scale: float | None = None,  # None: head_dim ** -0.5
        softcap: float | None = None,  # tanh soft-capping of the attention scores
        norm: type[nn.Module] = RMSNorm,  # the q/k norm's kind
    ) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.packed_sizes = {"qkv_proj": (self.q_size, self.kv_size, self.kv_size)}
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=o_bias)
        self.q_norm = norm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = norm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary = [rotary]  # a list: shared, not registered as this layer's submodule
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            layer_idx,
            sliding_window,
            scale=scale,
            softcap=softcap,
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        num_tokens, heads, kv_heads = hidden.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(hidden)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k, _ = qkv.split([self.q_size, self.kv_size, self.kv_size], -1)
            q = self.q_norm(q.reshape(num_tokens, heads, self.head_dim))  # [T, H, D]
            k = self.k_norm(k.reshape(num_tokens, kv_heads, self.head_dim))  # [T, Hkv, D]
            q, k = self.rotary[0](positions, q, k)
        else:
            # A backend that fuses rotary, the K/V write and decode attention (CPU, bf16).
            rotary = self.rotary[0]
            fused = self.attn.rope_forward(positions, qkv, rotary.cos, rotary.sin)
            if fused is not None:
                return self.o_proj(fused)
            # q and k side by side are [T, H + Hkv, D]: one rotation for both.
            qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, heads + kv_heads, -1)
            q, k = self.rotary[0].rotate(positions, qk).split([heads, kv_heads], dim=1)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    def __init__(
        self, config: PretrainedConfig, intermediate_size: int | None = None, act: str | None = None
    ) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.intermediate_size = intermediate_size or config.intermediate_size
        self.packed_sizes = {"gate_up_proj": (self.intermediate_size, self.intermediate_size)}
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=bias)
        self.act = ACT2FN[act or config.hidden_act]
        # SiLU and the product in one native pass where it builds (bf16 CPU rows).
        self.silu_and_mul = silu_and_mul() if isinstance(self.act, SiLUActivation) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2I]
        if (
            self.silu_and_mul is not None
            and gate_up.dtype == torch.bfloat16
            and gate_up.device.type == "cpu"
            and gate_up.dim() == 2
            and gate_up.is_contiguous()
        ):
            return self.down_proj(self.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, -1)
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, config: PretrainedConfig, self_attn: nn.Module, mlp: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp if mlp is not None else LlamaMLP(config)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        layers: list[nn.Module],
        norm: type[nn.Module] = RMSNorm,
        embed_scale: float | None = None,  # Gemma: embeddings times sqrt(hidden_size)
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = norm(config.hidden_size, config.rms_norm_eps)
        self.embed_scale = embed_scale
        # Built at the first forward, once the weights are loaded and packed (and LoRA
        # wrapped, which rules it out); None where it does not apply.
        self.native_decode: NativeLlamaDecode | None = None
        self._native_checked = False
        # A pipeline stage's layer range (distributed/pipeline_parallel.py); None: all.
        self.stage: Stage | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states [T, hidden]; a pipeline stage after the first starts from
        the previous stage's `intermediate` [T, hidden], one before the last returns its
        last layer's output (not normed)."""
        stage = self.stage
        if stage is None or stage.is_first:
            hidden = self.embed_tokens(input_ids)  # [T, hidden]
            if self.embed_scale is not None:
                # HF rounds the scale to the activation dtype first.
                hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        else:
            assert intermediate is not None  # the runner receives it for a later stage
            hidden = intermediate
        layers = self.layers if stage is None else self.layers[stage.start : stage.end]
        if not self._native_checked:
            self.native_decode = NativeLlamaDecode.create(list(layers), self.embed_scale)
            self._native_checked = True
        native = self.native_decode
        if native is None or not native.run(current_forward_context(), positions, hidden):
            for layer in layers:
                hidden = layer(positions, hidden)
        if stage is not None and not stage.is_last:
            return hidden
        return self.norm(hidden)


class LlamaForCausalLM(CausalLMBase):
    """Llama 2/3 (incl. llama3 rope scaling) and SmolLM2 (tied embeddings)."""

    packed_modules_mapping: ClassVar[PackedMapping] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    lora_target_modules: ClassVar[tuple[str, ...]] = (
        "self_attn.qkv_proj",
        "self_attn.o_proj",
        "mlp.gate_up_proj",
        "mlp.down_proj",
    )
    qk_norm = False

    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__(config)
        self.max_positions = max_positions
        self.rotary = self._rotary(max_positions)
        self.model = self._model([self._layer(i) for i in range(config.num_hidden_layers)])
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def _rotary(self, max_positions: int) -> RotaryEmbedding:
        return RotaryEmbedding(self.config, head_dim_of(self.config), max_positions)

    def _model(self, layers: list[nn.Module]) -> LlamaModel:
        return LlamaModel(self.config, layers)

    def _layer(self, i: int) -> nn.Module:
        qkv_bias, o_bias = self._attention_biases()
        attn = LlamaAttention(
            self.config,
            i,
            self.rotary,
            qkv_bias,
            o_bias,
            self.qk_norm,
            self._sliding_window(i),
        )
        return LlamaDecoderLayer(self.config, attn, self._mlp(i))

    def _mlp(self, layer_idx: int) -> nn.Module:
        return LlamaMLP(self.config)

    def _attention_biases(self) -> tuple[bool, bool]:
        """(bias on q/k/v, bias on o_proj)."""
        bias = bool(getattr(self.config, "attention_bias", False))
        return bias, bias

    def _sliding_window(self, layer_idx: int) -> int | None:
        return None

    def tie_weights(self) -> None:
        # A pipeline stage without the head (or the embedding) has nothing to tie.
        owned = not isinstance(self.lm_head, PPMissingLayer) and not isinstance(
            self.model.embed_tokens, PPMissingLayer
        )
        if self.tie_word_embeddings and owned:
            self.lm_head.weight = self.model.embed_tokens.weight

    def prepare(self, device: torch.device) -> None:
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.build_tables(device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
