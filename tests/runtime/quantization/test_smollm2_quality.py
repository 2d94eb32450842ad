"""The real SmolLM2-135M (GGUF Q4_1): perplexity on a fixed English text and weight memory in
bfloat16, int8 (the LM head too, as by default, and kept in bf16), FP8, and with the file's
4-bit blocks kept 4-bit (quantization="gguf"); the engine's bf16 perplexity is bounded by
transformers' own bf16 value (+1 %), the others by the engine's bf16."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from pinnace.runtime.layers.quantization.config import resolve_quantization
from pinnace.runtime.layers.quantization.embedding import QuantizedEmbedding
from pinnace.runtime.layers.quantization.fp8 import Fp8Linear
from pinnace.runtime.layers.quantization.int4 import Int4Linear
from pinnace.runtime.layers.quantization.int8 import Int8Linear
from pinnace.runtime.models.loader import build_model

pytestmark = pytest.mark.slow

# ~270 tokens of plain English, written for this test.
TEXT = """The river that runs through the old town has shaped its life for centuries. In the \
spring, melting snow from the mountains swells the water, and the fishermen wait on the stone \
bridge for the first trout of the season. Farmers bring their vegetables to the market square \
every Saturday morning, where they sell potatoes, carrots, onions and fresh bread baked before \
sunrise. Children play near the fountain while their parents talk about the weather, the price \
of wheat and the news from the capital.

During the summer, visitors arrive by train to walk along the narrow streets and admire the \
painted houses. Many of them stop at the small museum, which keeps letters, tools and \
photographs from the families who built the town. The guide explains how the first bridge was \
destroyed by a flood and rebuilt with stronger stones, and how the town hall was used as a \
hospital during the war.

In autumn, the leaves on the hills turn red and gold, and the harvest festival fills the square \
with music. People dance until late at night, and the bakers prepare sweet cakes with apples and \
honey. When winter comes, the streets become quiet. Smoke rises from the chimneys, the river \
freezes near its banks, and the old men sit by the fire telling stories about the years when \
the snow was so deep that nobody could leave their homes for a week."""


def _weight_bytes(model: nn.Module) -> int:
    """What the engine logs: every parameter once (quantized codes and scales included)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_perplexity_and_weight_memory_by_quantization(
    smollm2_checkpoint: Any, model_eval: SimpleNamespace, hf_smollm2_bf16: nn.Module
) -> None:
    ids = list(smollm2_checkpoint.tokenizer.encode(TEXT))
    assert 250 <= len(ids) <= 400
    # Dequantize the file once for the float-based builds ("gguf" reads its own blocks).
    cached = list(smollm2_checkpoint.weights(torch.bfloat16))
    ckpt = dataclasses.replace(smollm2_checkpoint, weights=lambda dtype: iter(cached))
    results: dict[str, tuple[float, int]] = {}
    for name in ("bf16", "int8", "int8 head bf16", "fp8", "gguf"):
        method = None if name == "bf16" else name.split()[0]
        quant = resolve_quantization(method, ckpt.config, ckpt.format, "head" not in name)
        model = build_model(ckpt, torch.bfloat16, torch.device("cpu"), 1024, quant)
        if name == "int8":  # 30 layers x 4 linears + the tied head; the embedding
            assert _count(model, Int8Linear) == 121 and _count(model, QuantizedEmbedding) == 1
        if name == "int8 head bf16":
            assert _count(model, Int8Linear) == 120 and _count(model, QuantizedEmbedding) == 0
        if method == "fp8":
            assert _count(model, Fp8Linear) == 121 and _count(model, QuantizedEmbedding) == 1
        if method == "gguf":  # Q4_1 linears stay 4-bit; the Q8_0 embedding (tied head) int8
            assert _count(model, Int4Linear) == 120 and _count(model, Int8Linear) == 1
        ppl = model_eval.perplexity(model, ckpt.config, ids, torch.bfloat16)
        results[name] = (ppl, _weight_bytes(model))
        del model
    base_ppl, base_bytes = results["bf16"]
    # The absolute bound: transformers' own bf16 model of the same file on the same text.
    with torch.inference_mode():
        logits = hf_smollm2_bf16(torch.tensor([ids])).logits[0, :-1].float()
    hf_ppl = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).exp().item()
    print(f"transformers bf16: perplexity {hf_ppl:.3f}; engine bf16 {base_ppl:.3f}")
    assert base_ppl <= 1.01 * hf_ppl
    params = sum(p.numel() for p in build_model(ckpt, torch.float32, torch.device("meta"), 16)
                 .parameters())  # fmt: skip
    for name, (ppl, size) in results.items():
        print(
            f"{name:>14}: perplexity {ppl:.3f} ({100 * (ppl / base_ppl - 1):+.2f} %), weights "
            f"{size / 2**20:.1f} MiB ({100 * size / base_bytes:.1f} % of bf16 as loaded, "
            f"{100 * size / (2 * params):.1f} % of 2 bytes x {params / 1e6:.1f} M parameters)"
        )
    # Issue #15: int8 within +1 % of bf16 (+0.96 % measured; +0.11 % with the head in bf16)
    assert results["int8"][0] <= 1.01 * base_ppl
    assert results["int8 head bf16"][0] <= results["int8"][0]
    assert results["fp8"][0] <= 1.03 * base_ppl
    assert results["gguf"][0] <= 1.01 * base_ppl  # the same weights, bf16-rounded scales
    # bf16 as loaded keeps the tied embedding twice (the head is repacked for oneDNN); the
    # int8 model must also be within 55 % of a bare 2 bytes per parameter.
    assert results["int8"][1] <= 0.55 * base_bytes
    assert results["int8"][1] <= 0.55 * 2 * params
    assert results["gguf"][1] < results["int8"][1]
