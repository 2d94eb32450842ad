"""Routed experts with int8 or FP8 (e4m3) weights: codes [E, out, in] with a scale per
(expert, output row), as Int8Linear / Fp8Linear have per row. A step dequantizes each
expert it routes tokens to once, for that expert's group of rows (a loop over experts hit,
never over tokens)."""

from __future__ import annotations

import torch
from torch import nn

from pinnace.runtime.layers.moe import ExpertGroups, FusedExperts
from pinnace.runtime.layers.quantization.fp8 import quantize_fp8
from pinnace.runtime.layers.quantization.int8 import frozen, quantize_int8

# [N, K] float -> (codes [N, K], scales [N]), per output row; the one table of the float
# -> weight-only methods (convert.py quantizes linears and embeddings with it too).
ROW_QUANTIZERS = {"int8": quantize_int8, "fp8": quantize_fp8}


def _quantized(
    weight: torch.Tensor, method: str, device: torch.device, amax: torch.Tensor | None = None
) -> tuple[nn.Parameter, nn.Parameter]:
    """`amax` [E, rows]: the rows' max |w| when `weight` holds a tensor-parallel shard of
    their columns (so every rank scales as the whole rows are scaled)."""
    experts, rows, cols = weight.shape
    flat_amax = None if amax is None else amax.reshape(-1).to(device)
    codes, scale = ROW_QUANTIZERS[method](weight.detach().to(device).reshape(-1, cols), flat_amax)
    return frozen(codes.view(experts, rows, cols)), frozen(scale.view(experts, rows))


class QuantizedFusedExperts(nn.Module):
    def __init__(
        self,
        experts: FusedExperts,
        method: str,
        device: torch.device,
        down_amax: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.method = method
        self.num_experts, self.intermediate = experts.num_experts, experts.intermediate
        self.dtype = experts.gate_up_proj.dtype
        self.gate_up_codes, self.gate_up_scale = _quantized(experts.gate_up_proj, method, device)
        self.down_codes, self.down_scale = _quantized(experts.down_proj, method, device, down_amax)
        self.act = experts.act

    def _weight(self, codes: torch.Tensor, scale: torch.Tensor, e: int) -> torch.Tensor:
        return (codes[e].float() * scale[e, :, None]).to(self.dtype)  # [out, in]

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        groups = ExpertGroups.of(ids, self.num_experts)
        rows = x[groups.tokens]  # [T*k, hidden], grouped by expert
        out = torch.empty_like(rows)
        start = 0
        for e, end in enumerate(groups.offs.tolist()):
            if end == start:
                continue
            gate_up = rows[start:end] @ self._weight(self.gate_up_codes, self.gate_up_scale, e).T
            gate, up = gate_up.chunk(2, dim=-1)
            down = self._weight(self.down_codes, self.down_scale, e)
            out[start:end] = (self.act(gate) * up) @ down.T
            start = end
        return groups.combine(x, out, weights)
