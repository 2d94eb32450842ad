"""Tensor parallelism (Megatron's split, as vLLM applies it), on our unchanged model code.

A rank's model is the architecture built from a *rank view* of its config: its share of
the query heads, KV heads (replicated when fewer than ranks), MLP width and (padded)
vocabulary, with head_dim pinned. So every layer already has its rank's shapes:

    qkv_proj, gate_up_proj   column-parallel: the rank's rows of each packed part
    o_proj, down_proj        row-parallel: the rank's input columns; outputs all-reduced
    experts (MoE)            each expert's gate/up column-parallel, down row-parallel (its
                             intermediate width split); the router is replicated, and the
                             block (routed experts plus Qwen2-MoE's shared expert, itself
                             split the same way) is all-reduced once
    embed_tokens             vocab-parallel: rows [r * V/tp, (r+1) * V/tp); ids outside
                             look up row 0 and are zeroed, then all-reduced
    lm_head                  vocab-parallel: local logits all-gathered, padding cut off

The collectives are forward hooks installed on the final modules (after quantization and
packing replaced them), so int8 layers, oneDNN-packed layers and plain ones shard alike.
`ShardSlicer` cuts each checkpoint tensor to the rank's part, reading only that part from
safetensors (`LazyTensor`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pinnace.runtime.distributed.parallel_state import ParallelGroup
from pinnace.runtime.layers.moe import FusedExperts, SparseMoeBlock

# HF module leaf -> how its output rows (or input columns) split over the ranks.
HEADS, KV_HEADS, COLUMN, ROW, VOCAB = "heads", "kv_heads", "column", "row", "vocab"
LEAF_SPLITS = {
    "q_proj": HEADS, "k_proj": KV_HEADS, "v_proj": KV_HEADS,
    "gate_proj": COLUMN, "up_proj": COLUMN,
    "o_proj": ROW, "down_proj": ROW,
    "w1": COLUMN, "w3": COLUMN, "w2": ROW,  # Mixtral's experts: gate, up, down
    "embed_tokens": VOCAB, "lm_head": VOCAB,
}  # fmt: skip
# MoE widths split like intermediate_size (Qwen-MoE's routed and shared experts).
MOE_WIDTHS = ("moe_intermediate_size", "shared_expert_intermediate_size")
# Checkpoints that store a packed module whole (Phi-3): its parts, in row order.
FUSED_PARTS = {"qkv_proj": (HEADS, KV_HEADS, KV_HEADS), "gate_up_proj": (COLUMN, COLUMN)}


@dataclass(frozen=True)
class TPShape:
    """The full model's sizes and this rank's share of them."""

    tp_rank: int
    tp_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @property
    def local_heads(self) -> int:
        return self.num_heads // self.tp_size

    @property
    def local_kv_heads(self) -> int:
        return max(1, self.num_kv_heads // self.tp_size)

    @property
    def local_vocab(self) -> int:
        return -(-self.vocab_size // self.tp_size)  # padded: ceil

    @property
    def vocab_start(self) -> int:
        return self.tp_rank * self.local_vocab

    def kv_head_start(self) -> int:
        """The first KV head this rank keeps (a replicated one serves tp/kv ranks)."""
        if self.num_kv_heads >= self.tp_size:
            return self.tp_rank * self.local_kv_heads
        return self.tp_rank * self.num_kv_heads // self.tp_size


def tp_shape(config: Any, tp_rank: int, tp_size: int) -> TPShape:
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    inter = int(getattr(config, "intermediate_size", 0) or 0)
    return TPShape(tp_rank, tp_size, heads, kv, head_dim, inter, int(config.vocab_size))


def rank_config(config: Any, shape: TPShape) -> Any:
    """A copy of the HF config with this rank's heads, KV heads, MLP width and vocab."""
    local = copy.deepcopy(config)
    local.num_attention_heads = shape.local_heads
    local.num_key_value_heads = shape.local_kv_heads
    local.head_dim = shape.head_dim  # no longer hidden_size // heads
    if shape.intermediate_size:
        local.intermediate_size = shape.intermediate_size // shape.tp_size
    for name in MOE_WIDTHS:
        if getattr(config, name, None):
            setattr(local, name, int(getattr(config, name)) // shape.tp_size)
    local.vocab_size = shape.local_vocab
    return local


class LazyTensor:
    """A safetensors tensor not read yet: `read` loads one row or column range only."""

    def __init__(self, handle: Any, name: str, dtype: torch.dtype | None) -> None:
        self.slice = handle.get_slice(name)
        self.shape = tuple(self.slice.get_shape())
        self.dtype = dtype  # None: keep the stored dtype

    def read(self, dim: int = 0, start: int = 0, length: int | None = None) -> torch.Tensor:
        length = self.shape[dim] - start if length is None else length
        rows = slice(start, start + length)
        t = self.slice[rows] if dim == 0 else self.slice[:, rows]
        return t if self.dtype is None else t.to(self.dtype)


Cut = tuple[int, int, int]  # (dim, start, length) of the checkpoint tensor


class ShardSlicer:
    """Cuts HF-named checkpoint tensors to this rank's part (None: replicated)."""

    def __init__(self, shape: TPShape) -> None:
        self.shape = shape

    def cuts(self, name: str, full_shape: tuple[int, ...]) -> list[Cut] | None:
        module, _, attr = name.rpartition(".")
        leaf = module.rpartition(".")[2]
        s = self.shape
        if leaf in FUSED_PARTS and attr in ("weight", "bias"):
            # [q | k | v] or [gate | up] stored whole: cut each part, keep the order.
            sizes = self._fused_sizes(leaf)
            cuts, offset = [], 0
            for kind, size in zip(FUSED_PARTS[leaf], sizes, strict=True):
                dim, start, length = self._rows(kind, size)
                cuts.append((dim, offset + start, length))
                offset += size
            return cuts
        kind = LEAF_SPLITS.get(leaf, "")
        if not kind or attr not in ("weight", "bias"):
            return None
        if kind == ROW:
            if attr == "bias":  # added once: rank 0 keeps it, the others add zeros
                return None
            per = full_shape[1] // s.tp_size
            return [(1, s.tp_rank * per, per)]
        if kind == VOCAB:
            start = min(s.vocab_start, s.vocab_size)
            return [(0, start, min(s.local_vocab, s.vocab_size - start))]
        return [self._rows(kind, full_shape[0])]

    def _rows(self, kind: str, rows: int) -> Cut:
        s = self.shape
        if kind == KV_HEADS:
            return (0, s.kv_head_start() * s.head_dim, s.local_kv_heads * s.head_dim)
        per = rows // s.tp_size  # heads and MLP width divide (model_split checks)
        return (0, s.tp_rank * per, per)

    def _fused_sizes(self, leaf: str) -> tuple[int, ...]:
        s = self.shape
        if leaf == "qkv_proj":
            kv = s.num_kv_heads * s.head_dim
            return (s.num_heads * s.head_dim, kv, kv)
        return (s.intermediate_size, s.intermediate_size)

    def take(self, name: str, tensor: torch.Tensor | LazyTensor) -> torch.Tensor:
        """This rank's part of a checkpoint tensor (read from disk only now if lazy)."""
        full_shape = tuple(tensor.shape)
        cuts = self.cuts(name, full_shape)
        if cuts is None:
            if self._is_row_bias(name) and self.shape.tp_rank != 0:
                whole = tensor.read() if isinstance(tensor, LazyTensor) else tensor
                return torch.zeros_like(whole)
            return tensor.read() if isinstance(tensor, LazyTensor) else tensor
        parts = [_cut(tensor, dim, start, length) for dim, start, length in cuts]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=cuts[0][0])

    @staticmethod
    def is_vocab(name: str) -> bool:
        return LEAF_SPLITS.get(name.rpartition(".")[0].rpartition(".")[2]) == VOCAB

    @staticmethod
    def _is_row_bias(name: str) -> bool:
        module, _, attr = name.rpartition(".")
        return attr == "bias" and LEAF_SPLITS.get(module.rpartition(".")[2]) == ROW


def _cut(tensor: torch.Tensor | LazyTensor, dim: int, start: int, length: int) -> torch.Tensor:
    if isinstance(tensor, LazyTensor):
        return tensor.read(dim, start, length)
    return tensor.narrow(dim, start, length).contiguous()


def install_collectives(model: nn.Module, group: ParallelGroup, shape: TPShape) -> int:
    """Forward hooks that make the rank's modules one model: all-reduce after row-parallel
    layers and the vocab-parallel embedding, all-gather after the LM head, one all-reduce
    after each MoE block (not after its shared expert's down_proj: the block's output is
    a sum of the rank's partial sums). Returns how many modules got one."""
    count = 0
    moe_blocks = [p for p, m in model.named_modules() if isinstance(m, SparseMoeBlock)]
    for path, module in model.named_modules():
        leaf = path.rpartition(".")[2]
        kind = LEAF_SPLITS.get(leaf)
        if path in moe_blocks:
            module.register_forward_hook(_all_reduce_hook(group))
        elif kind == ROW and any(path.startswith(f"{block}.") for block in moe_blocks):
            continue
        elif kind == ROW:
            module.register_forward_hook(_all_reduce_hook(group))
        elif kind == VOCAB and leaf == "embed_tokens":
            module.register_forward_pre_hook(_vocab_ids_hook(shape))
            module.register_forward_hook(_vocab_embed_hook(group))
        elif kind == VOCAB and leaf == "lm_head":
            module.register_forward_hook(_gather_logits_hook(group, shape.vocab_size))
        else:
            continue
        count += 1
    return count


Hook = Callable[..., Any]


def _all_reduce_hook(group: ParallelGroup) -> Hook:
    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        return group.all_reduce(out)

    return hook


def _vocab_ids_hook(shape: TPShape) -> Hook:
    """ids -> local rows; ids of other ranks look up row 0 (zeroed after the lookup)."""
    lo, hi = shape.vocab_start, shape.vocab_start + shape.local_vocab

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        ids = args[0]
        outside = (ids < lo) | (ids >= hi)
        module._tp_outside = outside  # read by the post hook
        return ((ids - lo).masked_fill(outside, 0), *args[1:])

    return hook


def _vocab_embed_hook(group: ParallelGroup) -> Hook:
    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        outside: torch.Tensor = module._tp_outside  # type: ignore[assignment]
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return group.all_reduce(out)

    return hook


def _gather_logits_hook(group: ParallelGroup, vocab_size: int) -> Hook:
    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        return group.all_gather_last_dim(out)[..., :vocab_size]

    return hook


def row_parallel_amax(model: nn.Module, group: ParallelGroup) -> dict[str, torch.Tensor]:
    """Per row-parallel linear: its rows' max |w| over all ranks' columns, so per-row
    int8/fp8 scales are those of the whole rows (TP=N quantizes exactly as TP=1)."""
    found: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if type(module) is nn.Linear and LEAF_SPLITS.get(path.rpartition(".")[2]) == ROW:
            found[path] = group.all_reduce_max(module.weight.detach().abs().amax(dim=1).float())
        elif isinstance(module, FusedExperts):  # down_proj [E, hidden, I/tp] -> [E, hidden]
            amax = module.down_proj.detach().abs().amax(dim=2).float()
            found[f"{path}.down_proj"] = group.all_reduce_max(amax)
    return found
