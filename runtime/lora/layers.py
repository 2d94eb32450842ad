"""LoRALinear: a model's projection plus the low-rank deltas of the step's adapters.

Wraps whatever module computes the projection (nn.Linear, a packed bf16 or a quantized
linear): the base output is computed once for all tokens, then for each adapter slot in
the step its rows (one slice, see context.py) get `(x @ a.T) @ bt` added (adapter.py has
the packed layout). With several slots in the step, their rows are padded to one length
and all slots run as two bmm calls (context.py decides; one long prefill next to short
decodes keeps the per-slot loop). No adapter weight is ever merged into the base weights.

Device tensors per wrapped module, one row block per slot:

    lora_a:  [max_loras, max_k, in]    max_k = parts * max_lora_rank
    lora_bt: [max_loras, max_k, out]   slot s uses rows [0, k_s) of both; k_s = 0: empty
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pinnace.runtime.lora.context import current_lora_batch
from pinnace.runtime.lora.targets import LoRAModelSpec, TargetModule


class LoRALinear(nn.Module):
    lora_a: torch.Tensor
    lora_bt: torch.Tensor

    def __init__(
        self,
        base: nn.Module,
        target: TargetModule,
        max_loras: int,
        max_lora_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.base = base
        self.target = target
        self.in_features, self.out_features = target.in_features, target.out_features
        max_k = len(target.parts) * max_lora_rank
        shape_a = (max_loras, max_k, target.in_features)
        shape_bt = (max_loras, max_k, target.out_features)
        self.register_buffer("lora_a", torch.zeros(shape_a, dtype=dtype, device=device), False)
        self.register_buffer("lora_bt", torch.zeros(shape_bt, dtype=dtype, device=device), False)
        self.slot_k = [0] * max_loras  # rows in use per slot (host side: no device sync)

    def set_slot(self, slot: int, weights: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Load one adapter's packed (a, bt) into a slot; None: it does not target us."""
        # Rows past k are zeroed: the batched path multiplies whole slots.
        if weights is None:
            self.lora_a[slot].zero_()
            self.slot_k[slot] = 0
            return
        a, bt = weights
        k = a.shape[0]
        self.lora_a[slot, :k].copy_(a, non_blocking=True)
        self.lora_a[slot, k:].zero_()
        self.lora_bt[slot, :k].copy_(bt, non_blocking=True)
        self.slot_k[slot] = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # [T, out]
        batch = current_lora_batch()
        if batch is None:
            return out
        grid = batch.padded(x.shape[0], x.device)
        if grid is not None:
            # All slots in two bmm calls: 3x faster than a pair of small matmuls per slot.
            rows = torch.cat((x, x.new_zeros(1, x.shape[1]))).index_select(0, grid.gather)
            xs = rows.view(grid.slots.shape[0], grid.length, -1)  # [S, L, in]
            a = self.lora_a.index_select(0, grid.slots)  # [S, max_k, in]
            bt = self.lora_bt.index_select(0, grid.slots)  # [S, max_k, out]
            delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), bt)  # [S, L, out]
            return out.index_add_(0, grid.scatter, delta.view(-1, out.shape[1]))
        for slot, start, end in batch.segments:
            k = self.slot_k[slot]
            if k == 0:
                continue
            h = F.linear(x[start:end], self.lora_a[slot, :k])  # [n, k]
            out[start:end] += h @ self.lora_bt[slot, :k]  # [n, out]
        return out


@dataclass(frozen=True)
class LoRASlotsConfig:
    """Room the wrapped layers reserve: adapters per step and their largest rank."""

    max_loras: int
    max_lora_rank: int


def install_lora_layers(
    model: nn.Module,
    spec: LoRAModelSpec,
    slots: LoRASlotsConfig,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[tuple[int, str], LoRALinear]:
    """Wrap every target module of every decoder layer in place (after weight loading, so
    packing and quantization have already replaced the base linears); returns them by
    (layer, module path)."""
    max_loras, max_lora_rank = slots.max_loras, slots.max_lora_rank
    layers = model.model.layers  # type: ignore[union-attr]
    wrapped: dict[tuple[int, str], LoRALinear] = {}
    for i, layer in enumerate(layers):  # type: ignore[arg-type]
        for target in spec.modules:
            block_name, attr = target.path.split(".")
            block = getattr(layer, block_name)
            base = getattr(block, attr)
            if isinstance(base, LoRALinear):
                raise RuntimeError("LoRA layers are already installed on this model.")
            lora = LoRALinear(base, target, max_loras, max_lora_rank, dtype, device)
            setattr(block, attr, lora)
            wrapped[(i, target.path)] = lora
    return wrapped


def installed_lora_layers(model: nn.Module) -> dict[tuple[int, str], LoRALinear]:
    """The LoRALinear modules `install_lora_layers` put in, by (layer, module path)."""
    found: dict[tuple[int, str], LoRALinear] = {}
    for i, layer in enumerate(model.model.layers):  # type: ignore[union-attr, arg-type]
        for path, module in layer.named_modules():
            if isinstance(module, LoRALinear):
                found[(i, path)] = module
    return found
