"""GPTQ and AWQ checkpoints built here in the reference packings from tiny float models: the
loaded 4-bit layers decode to exactly the weights that were packed, and greedy generation
equals the dequantized float model's token for token (float32)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.layers.quantization.int4 import Int4Linear

PROMPTS = ["Hello, my name is", "The capital of France is", "1 2 3 4 5", "Once upon a time"]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
ENGINE = dict(dtype="float32", num_kv_blocks=64, max_model_len=512)


@pytest.fixture(scope="module")
def build(
    tmp_path_factory: pytest.TempPathFactory,
    make_tiny_model: Callable[[str], Path],
    quant_kit: SimpleNamespace,
) -> Callable[..., tuple[Path, dict[str, torch.Tensor]]]:
    """(arch, method, group_size, act_order, fmt) -> (checkpoint dir, HF name -> reference)."""

    def make(
        arch: str, method: str, group_size: int, act_order: str = "none", fmt: str = "gptq"
    ) -> tuple[Path, dict[str, torch.Tensor]]:
        out = tmp_path_factory.mktemp("q") / f"{arch}-{method}-{group_size}-{act_order}-{fmt}"

        def pack(module: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
            g_idx = None
            if act_order != "none":
                # Real GPTQ quantizes q/k/v (and gate/up) from the same inputs, so they share
                # one act-order permutation; "per-layer" gives each its own (fallback path).
                prefix, _, leaf = module.rpartition(".")
                shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv"}
                shared.update(gate_proj="gu", up_proj="gu")
                key = module if act_order == "per-layer" else f"{prefix}.{shared.get(leaf, leaf)}"
                seed = sum(i * ord(c) for i, c in enumerate(key))
                g_idx = quant_kit.act_order_g_idx(weight.shape[1], group_size, seed)
            qt = quant_kit.rtn_quantize(weight, group_size, g_idx)
            parts = (
                quant_kit.pack_gptq(qt, fmt == "gptq")
                if method == "gptq"
                else (quant_kit.pack_awq(qt))
            )
            return {**parts, "_reference": qt.dequantize()}

        config: dict[str, Any] = {"quant_method": method, "bits": 4, "group_size": group_size}
        if method == "gptq":
            config.update(desc_act=act_order != "none", sym=False, checkpoint_format=fmt)
        else:
            config.update(zero_point=True, version="gemm")
        refs = quant_kit.write_quantized_checkpoint(make_tiny_model(arch), out, config, pack)
        return out, refs

    return make


def _loaded_layers(llm: LLM) -> dict[str, nn.Module]:
    model = llm.llm_engine.parts.runner.model
    return {name: m for name, m in model.named_modules() if name.endswith("_proj")}


def _reference_for(path: str, refs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Our packed layer path -> the concatenation of its HF layers' reference weights."""
    prefix, _, leaf = path.rpartition(".")
    shards = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    return torch.cat([refs[f"{prefix}.{s}"] for s in shards.get(leaf, [leaf])])


def _weight_of(module: nn.Module) -> torch.Tensor:
    if isinstance(module, Int4Linear):
        return module.dequantized_weight()
    assert isinstance(module, nn.Linear)
    return module.weight.detach().float()


CASES = [
    # arch, method, group size, act order, checkpoint format
    ("LlamaForCausalLM", "gptq", 32, "shared", "gptq"),  # act-order, v1 zeros (+1)
    ("Qwen2ForCausalLM", "gptq", -1, "none", "gptq_v2"),  # qkv bias, untied head, per-row
    ("LlamaForCausalLM", "awq", 32, "none", "gptq"),
    ("Qwen2ForCausalLM", "awq", 64, "none", "gptq"),
]


@pytest.mark.parametrize(("arch", "method", "group_size", "act_order", "fmt"), CASES)
def test_checkpoint_loads_exactly_and_generates_like_the_dequantized_model(
    build: Callable[..., tuple[Path, dict[str, torch.Tensor]]],
    arch: str,
    method: str,
    group_size: int,
    act_order: str,
    fmt: str,
) -> None:
    path, refs = build(arch, method, group_size, act_order, fmt)
    llm = LLM(model=str(path), **ENGINE)
    assert llm.llm_engine.parts.quantization == method
    layers = _loaded_layers(llm)
    assert len(layers) == 4 * 2  # qkv, o, gate_up, down in each of the 2 layers
    for name, module in layers.items():
        assert isinstance(module, Int4Linear) and module.use_kernel, name
        assert (module.perm is not None) == (act_order != "none"), name
        torch.testing.assert_close(
            module.dequantized_weight(), _reference_for(name, refs), rtol=1e-5, atol=1e-6
        )
    expected = LLM(model=f"{path}-dequantized", **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False)
    got = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


def test_act_order_shards_with_different_permutations_load_as_float_layers(
    build: Callable[..., tuple[Path, dict[str, torch.Tensor]]],
) -> None:
    """q/k/v quantized with different act orders cannot share one 4-bit kernel call: they are
    dequantized into a float layer, still exactly the packed weights."""
    path, refs = build("LlamaForCausalLM", "gptq", 32, "per-layer")
    llm = LLM(model=str(path), **ENGINE)
    layers = _loaded_layers(llm)
    assert type(layers["model.layers.0.self_attn.qkv_proj"]) is nn.Linear
    assert isinstance(layers["model.layers.0.self_attn.o_proj"], Int4Linear)
    for name, module in layers.items():
        torch.testing.assert_close(
            _weight_of(module), _reference_for(name, refs), rtol=1e-5, atol=1e-6
        )
    expected = LLM(model=f"{path}-dequantized", **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False)
    got = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


def test_bfloat16_runs_the_cpu_4bit_kernel_close_to_the_reference(
    build: Callable[..., tuple[Path, dict[str, torch.Tensor]]],
) -> None:
    path, refs = build("LlamaForCausalLM", "gptq", 32, "shared", "gptq")
    llm = LLM(model=str(path), **{**ENGINE, "dtype": "bfloat16"})
    module = _loaded_layers(llm)["model.layers.1.mlp.gate_up_proj"]
    assert isinstance(module, Int4Linear) and module.use_kernel
    x = torch.randn(3, module.in_features)
    expected = x @ _reference_for("model.layers.1.mlp.gate_up_proj", refs).T
    got = module(x.bfloat16()).float()
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()


# ---------------------------------------------------------------------------------------------
# Malformed checkpoints: a clear ValueError, raised before any generation
# ---------------------------------------------------------------------------------------------


def _variant(src: Path, dst: Path, config_edit: dict[str, Any] | None = None) -> Path:
    shutil.copytree(src, dst)
    if config_edit is not None:
        config = json.loads((dst / "config.json").read_text())
        config["quantization_config"].update(config_edit)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"bits": 3}, "bits=3 are not supported; only 4-bit"),
        ({"group_size": 0}, "group_size must be a positive integer or -1"),
        ({"desc_act": "yes"}, "desc_act must be true/false"),
        ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
        ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not supported"),
        ({"group_size": 64}, "is group_size 64 right?"),
    ],
)
def test_malformed_gptq_config_fails_clearly(
    build: Callable[..., tuple[Path, dict[str, torch.Tensor]]],
    tmp_path: Path,
    edit: dict[str, Any],
    message: str,
) -> None:
    path, _ = build("LlamaForCausalLM", "gptq", 32, "none", "gptq")
    with pytest.raises(ValueError, match=message.replace("?", r"\?").replace("(", r"\(")):
        LLM(model=str(_variant(path, tmp_path / "bad", edit)), **ENGINE)


def test_missing_bits_and_wrong_awq_version_fail_clearly(
    build: Callable[..., tuple[Path, dict[str, torch.Tensor]]], tmp_path: Path
) -> None:
    path, _ = build("LlamaForCausalLM", "awq", 32)
    with pytest.raises(ValueError, match="only the GEMM packing"):
        LLM(model=str(_variant(path, tmp_path / "gemv", {"version": "gemv"})), **ENGINE)
    bad = _variant(path, tmp_path / "nobits")
    config = json.loads((bad / "config.json").read_text())
    del config["quantization_config"]["bits"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing 'bits'"):
        LLM(model=str(bad), **ENGINE)


def test_missing_tensor_and_conflicting_request_fail_clearly(
    build: Callable[..., tuple[Path, dict[str, torch.Tensor]]], tmp_path: Path
) -> None:
    path, _ = build("LlamaForCausalLM", "gptq", 32)
    bad = _variant(path, tmp_path / "noqzeros")
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.qzeros"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks qzeros for layer model\.layers\.1\.self_attn"):
        LLM(model=str(bad), **ENGINE)
    with pytest.raises(ValueError, match="already quantized with gptq"):
        LLM(model=str(path), quantization="int8", **ENGINE)
    with pytest.raises(ValueError, match="needs a checkpoint quantized with GPTQ"):
        LLM(model=f"{path}-dequantized", quantization="gptq", **ENGINE)
