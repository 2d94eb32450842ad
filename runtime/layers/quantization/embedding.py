"""Token embedding held as int8 or FP8 codes with one scale per row (per token).

Row scales are exactly the LM head's per-output-channel scales, so a tied model keeps one
copy of the codes: the embedding looks rows up, the head multiplies by the same matrix.
"""

from __future__ import annotations

import torch
from torch import nn


class QuantizedEmbedding(nn.Module):
    def __init__(self, codes: nn.Parameter, scale: nn.Parameter, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        self.weight = codes  # shared with a tied LM head: the same Parameter objects
        self.weight_scale = scale
        self.dtype = dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight[input_ids].to(self.dtype)  # [T, hidden]
        return rows * self.weight_scale[input_ids].to(self.dtype).unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, codes={self.weight.dtype}"
