"""Mixture of experts: top-k routing and the experts as grouped matmuls.

Every token picks its top-k experts; its k (token, expert) assignments are sorted by
expert, so each expert's rows are one contiguous group and each projection is a grouped
matmul: one matmul per expert over all its rows (never a loop over tokens):

    ids     [T, k]  -> flat [T*k] -> order (stable argsort by expert)
    rows    x[order // k]                       [T*k, hidden], expert 0's rows first
    offs    cumulative rows per expert          [E] (int32 group ends)
    h       act(gate) * up of grouped_mm(rows, gate_up[e].T)      [T*k, I]
    out     grouped_mm(h, down[e].T) * weight  -> index_add into the token's row

Summing a token's experts in expert order, as HF does, keeps fp32 results identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] in the logits' dtype, expert ids [T, k]):
    softmax in float32, top-k, optionally renormalised to sum to 1 (HF's order)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of group e (ending at offs[e]) times weight[e].T: x [N, in], weight [E, out, in]
    -> [N, out], as one F.linear per non-empty group. On CPU this beats torch._grouped_mm,
    a slow fallback there (98 ms vs 28 ms for 8 experts x 4 rows, 512 -> 2048, bf16, 2
    threads); a fused CUDA grouped GEMM is for when it can be tested on a GPU."""
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = F.linear(x[start:end], weight[e])
        start = end
    return out


class FusedExperts(nn.Module):
    """E gated MLPs with stacked weights, HF's (v5) fused layout:
    gate_up_proj [E, 2I, hidden] (gate rows first), down_proj [E, hidden, I]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.num_experts, self.intermediate = num_experts, intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.packed_sizes = {"gate_up_proj": (intermediate, intermediate), "down_proj": (hidden,)}
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, hidden]; ids, weights [T, k] -> sum over k of weight * expert(x): [T, hidden]."""
        groups = ExpertGroups.of(ids, self.num_experts)
        gate, up = grouped_mm(x[groups.tokens], self.gate_up_proj, groups.offs).chunk(2, dim=-1)
        out = grouped_mm(self.act(gate) * up, self.down_proj, groups.offs)  # [T*k, hidden]
        return groups.combine(x, out, weights)


@dataclass
class ExpertGroups:
    """A step's (token, expert) assignments sorted by expert (see the module docstring)."""

    order: torch.Tensor  # [T*k] flat assignment index, expert 0's first (stable)
    tokens: torch.Tensor  # [T*k] the token of each sorted assignment
    offs: torch.Tensor  # [E] int32 end of each expert's group

    @classmethod
    def of(cls, ids: torch.Tensor, num_experts: int) -> ExpertGroups:
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        offs = torch.bincount(flat, minlength=num_experts).cumsum(0).to(torch.int32)
        return cls(order, order // ids.shape[1], offs)

    def combine(self, x: torch.Tensor, out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted expert outputs [T*k, hidden] (sorted) -> summed per token [T, hidden]."""
        out = out * weights.reshape(-1)[self.order, None]
        return torch.zeros_like(x).index_add_(0, self.tokens, out)


class SparseMoeBlock(nn.Module):
    """Router (`gate`) and routed experts: Mixtral's block, and the core of Qwen-MoE's."""

    def __init__(
        self,
        hidden: int,
        num_experts: int,
        top_k: int,
        intermediate: int,
        act: str,
        renormalize: bool,
    ) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = FusedExperts(num_experts, hidden, intermediate, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        return self.experts(x, ids, weights)
