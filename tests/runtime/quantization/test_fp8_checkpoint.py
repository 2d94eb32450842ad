"""Checkpoints stored in FP8 (`quant_method: fp8`): per-tensor scales (AutoFP8 / vLLM style,
with static input scales) and 128x128-style block scales (`weight_scale_inv`), written here
from tiny float models; loaded weights and greedy tokens equal the dequantized model's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.layers.quantization.fp8 import Fp8Linear

PROMPTS = ["Hello, my name is", "The capital of France is", "1 2 3 4 5"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
ENGINE = dict(dtype="float32", num_kv_blocks=64, max_model_len=512)
FP8_MAX = 448.0


def _per_tensor(module: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    scale = weight.abs().max() / FP8_MAX
    codes = (weight / scale).to(torch.float8_e4m3fn)
    return {
        "weight": codes,
        "weight_scale": scale.reshape(()),
        "input_scale": torch.tensor(0.05),  # static activation scale: accepted, not used
        "_reference": codes.float() * scale,
    }


def _blocks(module: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    rows, cols = weight.shape
    blocks = weight.reshape(rows // 32, 32, cols // 32, 32)
    scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX  # [rows / 32, cols / 32]
    full = scale.repeat_interleave(32, 0).repeat_interleave(32, 1)
    codes = (weight / full).to(torch.float8_e4m3fn)
    return {"weight": codes, "weight_scale_inv": scale, "_reference": codes.float() * full}


@pytest.mark.parametrize(
    ("arch", "pack", "config"),
    [
        ("Qwen2ForCausalLM", _per_tensor, {"activation_scheme": "static"}),
        ("LlamaForCausalLM", _blocks, {"weight_block_size": [32, 32]}),
    ],
)
def test_fp8_checkpoint_loads_exactly_and_generates_like_the_dequantized_model(
    tmp_path: Path,
    make_tiny_model: Callable[[str], Path],
    quant_kit: SimpleNamespace,
    arch: str,
    pack: Callable[[str, torch.Tensor], dict[str, torch.Tensor]],
    config: dict[str, object],
) -> None:
    out = tmp_path / "fp8"
    refs = quant_kit.write_quantized_checkpoint(
        make_tiny_model(arch), out, {"quant_method": "fp8", **config}, pack
    )
    llm = LLM(model=str(out), **ENGINE)
    assert llm.llm_engine.parts.quantization == "fp8"
    model = llm.llm_engine.parts.runner.model
    layer = model.model.layers[1].self_attn.qkv_proj
    assert isinstance(layer, Fp8Linear)
    prefix = "model.layers.1.self_attn"
    expected = torch.cat([refs[f"{prefix}.{s}"] for s in ("q_proj", "k_proj", "v_proj")])
    torch.testing.assert_close(layer.dequantized_weight(), expected)
    assert isinstance(model.model.layers[0].mlp.down_proj, Fp8Linear)
    want = LLM(model=f"{out}-dequantized", **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False)
    got = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
