"""Llama, and the decoder building blocks the other Llama-like architectures reuse.

Our modules mirror HF's names except that q/k/v and gate/up are packed into one matmul
each (`qkv_proj`, `gate_up_proj`); `load_weights` maps HF's separate tensors into them.
Every forward works on the step's flattened tokens: hidden states are [T, hidden].
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from pinnace.runtime.layers.attention import Attention
from pinnace.runtime.layers.norm import RMSNorm
from pinnace.runtime.layers.rotary import RotaryEmbedding


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
    ) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary = [rotary]  # a list: shared, not registered as this layer's submodule
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim, layer_idx, sliding_window
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
            # q and k side by side are [T, H + Hkv, D]: one rotation for both.
            qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, heads + kv_heads, -1)
            q, k = self.rotary[0].rotate(positions, qk).split([heads, kv_heads], dim=1)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=bias)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, -1)
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, self_attn: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, layers: list[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, hidden]
        for layer in self.layers:
            hidden = layer(positions, hidden)
        return self.norm(hidden)


# (our packed parameter, HF's name, shard index): shards are laid out in this order.
PACKED_SHARDS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    """Llama 2/3 (incl. llama3 rope scaling) and SmolLM2 (tied embeddings)."""

    qk_norm = False

    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        self.rotary = RotaryEmbedding(config, head_dim, max_positions)
        self.model = LlamaModel(config, [self._layer(i) for i in range(config.num_hidden_layers)])
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

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
        return LlamaDecoderLayer(self.config, attn)

    def _attention_biases(self) -> tuple[bool, bool]:
        """(bias on q/k/v, bias on o_proj)."""
        bias = bool(getattr(self.config, "attention_bias", False))
        return bias, bias

    def _sliding_window(self, layer_idx: int) -> int | None:
        return None

    def tie_weights(self) -> None:
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into our parameters; returns the names of those loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            target, shard = _packed_target(name)
            if target not in params:
                raise ValueError(
                    f"checkpoint tensor {name!r} has no place in {type(self).__name__}"
                )
            param = params[target]
            with torch.no_grad():
                dest = param if shard is None else self._shard(param, target, shard)
                if dest.shape != tensor.shape:
                    raise ValueError(
                        f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(dest.shape)}"
                    )
                dest.copy_(tensor)
            loaded.add(target if shard is None else f"{target}#{shard}")
        return loaded

    def _shard(self, param: torch.Tensor, name: str, shard: int) -> torch.Tensor:
        if ".qkv_proj." in name:
            attn: LlamaAttention = self.model.layers[0].self_attn  # type: ignore[assignment]
            sizes = [attn.q_size, attn.kv_size, attn.kv_size]
        else:
            sizes = [self.config.intermediate_size] * 2
        start = sum(sizes[:shard])
        return param.narrow(0, start, sizes[shard])

    def expected_weights(self) -> set[str]:
        names: set[str] = set()
        for name, _ in self.named_parameters():
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            if ".qkv_proj." in name:
                names.update(f"{name}#{i}" for i in range(3))
            elif ".gate_up_proj." in name:
                names.update(f"{name}#{i}" for i in range(2))
            else:
                names.add(name)
        return names


def _packed_target(name: str) -> tuple[str, int | None]:
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in PACKED_SHARDS:
        packed, shard = PACKED_SHARDS[parts[-2]]
        return ".".join([*parts[:-2], packed, parts[-1]]), shard
    return name, None
