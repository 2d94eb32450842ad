"""The int8 LM head and token embedding under quantization="int8": a tied pair keeps one
copy of the codes; the head's logits (native GEMV rows and the two-digit GEMM's rows)
against a float64 reference, the embedding's rows exact; `quantize_lm_head=False` keeps
both in floats and is refused where it cannot apply."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pinnace.runtime.config import EngineConfig
from pinnace.runtime.kernels.int8_digits import REQUIRED_CPU_FLAGS as DIGITS_FLAGS
from pinnace.runtime.kernels.int8_digits import int8_digits_matmul
from pinnace.runtime.kernels.int8_gemv import REQUIRED_CPU_FLAGS, int8_gemv
from pinnace.runtime.layers.quantization.config import resolve_quantization
from pinnace.runtime.layers.quantization.convert import quantize_linears
from pinnace.runtime.layers.quantization.embedding import QuantizedEmbedding
from pinnace.runtime.layers.quantization.int8 import Int8Linear

pytestmark = pytest.mark.usefixtures("fresh_kernels")

VOCAB, HIDDEN = 4099, 192  # a vocabulary that is no multiple of the GEMV's 4-row blocks


class TiedLM(nn.Module):
    """Just the parts quantize_linears treats specially: a tied embedding and head."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.model.proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        with torch.no_grad():
            self.model.embed_tokens.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=g) * 0.05)
            self.model.proj.weight.copy_(torch.randn(HIDDEN, HIDDEN, generator=g) * 0.05)
        self.lm_head.weight = self.model.embed_tokens.weight
        self.to(torch.bfloat16)


def _hidden(rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rows)
    # Final-norm outputs: channels of very different sizes.
    return (torch.randn(rows, HIDDEN, generator=g) * torch.rand(HIDDEN, generator=g) * 4).bfloat16()


@pytest.mark.parametrize("rows", [1, 2, 32])
def test_tied_int8_head_matches_float64_reference(native_kernel: object, rows: int) -> None:
    native_kernel(int8_gemv, REQUIRED_CPU_FLAGS)  # type: ignore[operator]
    native_kernel(int8_digits_matmul, DIGITS_FLAGS)  # type: ignore[operator]
    model = TiedLM()
    assert quantize_linears(model, "int8", torch.device("cpu")) == 3
    head, embed = model.lm_head, model.model.embed_tokens
    assert isinstance(head, Int8Linear) and isinstance(embed, QuantizedEmbedding)
    assert head.weight is embed.weight and head.weight.dtype == torch.int8  # one copy
    assert head.native is not None and head.digits is not None
    x = _hidden(rows)
    w = head.dequantized_weight().double()  # [V, H]: codes x bf16 scales
    ref = x.double() @ w.T
    out = head(x).double()
    # 1-2 rows (native GEMV): 24-bit activations, exact up to the bf16 rounding; more rows
    # (two int8 digits through oneDNN): max|x| / (127 x 508) per unit of sum|w|.
    digits = 2.0**-22 if rows <= 2 else 1.01 / (127 * 508)
    bound = ref.abs() * 2.0**-8 + x.double().abs().amax(1, keepdim=True) * w.abs().sum(1) * digits
    assert ((out - ref).abs() <= bound).all()
    if rows <= 2:  # and mostly the correctly rounded logit
        assert (out == ref.to(torch.bfloat16).double()).double().mean() >= 0.99
    # The embedding gathers rows of the same codes: exactly codes x scale in bf16.
    ids = torch.tensor([0, 7, VOCAB - 1, 7])
    assert torch.equal(embed(ids), w[ids].to(torch.bfloat16))


def test_keep_head_leaves_head_and_embedding_in_floats() -> None:
    model = TiedLM()
    assert quantize_linears(model, "int8", torch.device("cpu"), keep_head=True) == 1
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert isinstance(model.model.proj, Int8Linear)


def test_quantize_lm_head_option_is_checked() -> None:
    assert not EngineConfig("m", quantization="int8", quantize_lm_head=False).quantize_lm_head
    with pytest.raises(ValueError, match="quantize_lm_head=False applies to"):
        EngineConfig("m", quantize_lm_head=False)
    with pytest.raises(ValueError, match="quantize_lm_head=False applies to"):
        EngineConfig("m", quantization="gptq", quantize_lm_head=False)
    float_config = SimpleNamespace()
    quant = resolve_quantization("int8", float_config, "safetensors", lm_head=False)
    assert quant is not None and not quant.lm_head
    stored = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    gptq = SimpleNamespace(quantization_config=stored)
    with pytest.raises(ValueError, match="applies to float checkpoints only"):
        resolve_quantization(None, gptq, "safetensors", lm_head=False)
