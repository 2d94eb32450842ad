"""Quantization test kit: a round-to-nearest 4-bit quantizer, the reference GPTQ / AWQ packings
(written here from the AutoGPTQ / AutoAWQ packers' definitions), and checkpoint writers
(the real model and its full-sequence forward are in tests/runtime/conftest.py)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an int32 holds column 8c + ORDER[i]


@dataclass
class Quantized:
    """RTN 4-bit codes of one [N, K] weight in GPTQ's terms."""

    q: torch.Tensor  # int64 [N, K], 0..15
    scales: torch.Tensor  # float16 [groups, N]
    zeros: torch.Tensor  # int64 [groups, N]
    g_idx: torch.Tensor  # int64 [K]

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]: scales[g, n] * (q[n, k] - zeros[g, n]) with g = g_idx[k]."""
        s = self.scales.float()[self.g_idx].T  # [N, K]
        z = self.zeros[self.g_idx].T
        return s * (self.q - z).float()


def rtn_quantize(w: torch.Tensor, group_size: int, g_idx: torch.Tensor | None = None) -> Quantized:
    """Asymmetric round-to-nearest over the columns of each group (GPTQ's quantizer grid)."""
    num_out, num_in = w.shape
    size = num_in if group_size == -1 else group_size
    g_idx = torch.arange(num_in) // size if g_idx is None else g_idx
    groups = int(g_idx.max()) + 1
    scales = torch.empty(groups, num_out, dtype=torch.float16)
    zeros = torch.empty(groups, num_out, dtype=torch.long)
    q = torch.empty(num_out, num_in, dtype=torch.long)
    for g in range(groups):
        cols = g_idx == g
        wg = w[:, cols].float()
        lo, hi = wg.min(1).values.clamp(max=0), wg.max(1).values.clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-5).half()
        # Zeros kept in 1..15: GPTQ v1 stores zero - 1, which must not underflow.
        zero = torch.round(-lo / scale.float()).clamp(1, 15).long()
        q[:, cols] = (torch.round(wg / scale.float()[:, None]) + zero[:, None]).clamp(0, 15).long()
        scales[g], zeros[g] = scale, zero
    return Quantized(q, scales, zeros, g_idx)


def act_order_g_idx(num_in: int, group_size: int, seed: int) -> torch.Tensor:
    """g_idx as GPTQ act-order writes it: column perm[j] belongs to group j // group_size."""
    perm = torch.randperm(num_in, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(num_in, dtype=torch.long)
    g_idx[perm] = torch.arange(num_in) // group_size
    return g_idx


def pack_gptq(qt: Quantized, v1: bool) -> dict[str, torch.Tensor]:
    """AutoGPTQ's pack(): qweight rows pack 8 inputs, qzeros columns 8 outputs; v1: zeros - 1."""
    intweight = qt.q.T.numpy().astype(np.uint32)  # [K, N]
    qweight = np.zeros((intweight.shape[0] // 8, intweight.shape[1]), dtype=np.uint32)
    for row in range(qweight.shape[0]):
        for j in range(8):
            qweight[row] |= intweight[8 * row + j] << (4 * j)
    zeros = (qt.zeros - 1 if v1 else qt.zeros).numpy().astype(np.uint32)
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 8), dtype=np.uint32)
    for col in range(qzeros.shape[1]):
        for j in range(8):
            qzeros[:, col] |= zeros[:, 8 * col + j] << (4 * j)
    return {
        "qweight": torch.from_numpy(qweight.astype(np.int32)),
        "qzeros": torch.from_numpy(qzeros.astype(np.int32)),
        "scales": qt.scales.clone(),
        "g_idx": qt.g_idx.to(torch.int32),
    }


def pack_awq(qt: Quantized) -> dict[str, torch.Tensor]:
    """AutoAWQ WQLinear_GEMM.from_linear(): both packed along outputs in AWQ_PACK_ORDER."""

    def pack_cols(values: np.ndarray) -> np.ndarray:
        out = np.zeros((values.shape[0], values.shape[1] // 8), dtype=np.uint32)
        for col in range(out.shape[1]):
            for i in range(8):
                out[:, col] |= values[:, col * 8 + AWQ_PACK_ORDER[i]] << (4 * i)
        return out.astype(np.int32)

    return {
        "qweight": torch.from_numpy(pack_cols(qt.q.T.numpy().astype(np.uint32))),
        "qzeros": torch.from_numpy(pack_cols(qt.zeros.numpy().astype(np.uint32))),
        "scales": qt.scales.clone(),
    }


def write_quantized_checkpoint(
    float_dir: Path,
    out_dir: Path,
    quantization_config: dict[str, Any],
    pack: Callable[[str, torch.Tensor], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Copy an HF folder, replacing every linear weight by `pack(name, weight)`'s tensors.

    Returns HF linear name -> the float32 weight the packed tensors decode to, and writes
    that dequantized model next to it as `<out_dir>-dequantized` (a plain float checkpoint).
    """
    shutil.copytree(float_dir, out_dir)
    tensors = load_file(str(out_dir / "model.safetensors"))
    packed: dict[str, torch.Tensor] = {}
    dequantized = dict(tensors)
    references: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        module, _, attr = name.rpartition(".")
        if attr != "weight" or module.rpartition(".")[2] not in LINEARS:
            packed[name] = tensor
            continue
        parts = pack(module, tensor)
        reference = parts.pop("_reference")
        packed.update({f"{module}.{k}": v.contiguous() for k, v in parts.items()})
        dequantized[name] = references[module] = reference
    save_file(packed, str(out_dir / "model.safetensors"))
    config = json.loads((out_dir / "config.json").read_text())
    deq_dir = out_dir.parent / f"{out_dir.name}-dequantized"
    shutil.copytree(float_dir, deq_dir)
    save_file(
        {k: v.contiguous() for k, v in dequantized.items()}, str(deq_dir / "model.safetensors")
    )
    config["quantization_config"] = quantization_config
    (out_dir / "config.json").write_text(json.dumps(config))
    return references


@pytest.fixture(scope="session")
def quant_kit() -> SimpleNamespace:
    """The helpers above, as one fixture (tests run in importlib mode: no helper imports)."""
    return SimpleNamespace(
        rtn_quantize=rtn_quantize,
        act_order_g_idx=act_order_g_idx,
        pack_gptq=pack_gptq,
        pack_awq=pack_awq,
        write_quantized_checkpoint=write_quantized_checkpoint,
    )


# ---------------------------------------------------------------------------------------------
# The real model: opened once, full-sequence forwards
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def reuse_checkpoint(monkeypatch: pytest.MonkeyPatch, smollm2_checkpoint: Any) -> str:
    """Make LLM(model=<the GGUF>) reuse the opened checkpoint; returns the path to pass."""
    import pinnace.runtime.engine.setup as setup

    monkeypatch.setattr(setup, "open_checkpoint", lambda path, template=None: smollm2_checkpoint)
    return str(smollm2_checkpoint.path)
