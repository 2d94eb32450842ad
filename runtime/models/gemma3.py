"""Gemma 3 (text): Gemma 2 with these differences

- q and k are RMS-normed per head before rotary (GemmaRMSNorm), and there is no attention
  soft-capping in the released configs (the code path stays: it follows the config);
- local (sliding-window) and global layers interleave by `layer_types` (5:1), and each kind
  rotates with its own parameters: rope_parameters["sliding_attention"] (base 10k) and
  rope_parameters["full_attention"] (base 1M, possibly scaled).
"""

from __future__ import annotations

from pinnace.runtime.layers.rotary import RotaryEmbedding
from pinnace.runtime.models.gemma2 import Gemma2ForCausalLM
from pinnace.runtime.models.llama import head_dim_of


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = True
    rotary_local: RotaryEmbedding  # set with self.rotary, before the layers that take them

    def _rotary(self, max_positions: int) -> RotaryEmbedding:
        head_dim = head_dim_of(self.config)
        self.rotary_local = RotaryEmbedding(
            self.config, head_dim, max_positions, "sliding_attention"
        )
        return RotaryEmbedding(self.config, head_dim, max_positions, "full_attention")

    def _rotary_of(self, layer_idx: int) -> RotaryEmbedding:
        if self.config.layer_types[layer_idx] == "sliding_attention":
            return self.rotary_local
        return self.rotary
