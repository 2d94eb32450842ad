"""Tiny GGUF checkpoints, written with `gguf.GGUFWriter` as llama.cpp would lay them out:
llama.cpp's metadata for a small Llama, Mistral or Qwen2, a byte-level BPE tokenizer with a
chat template, and every matrix in one tensor type (quantized by gguf where it can, valid raw
blocks where it cannot); or any architecture's random transformers model (`write_hf_model`).

test_gguf_loader.py loads this file by path: under `--import-mode=importlib` a helper module
in a test folder is not importable by name (tests/operator/conftest.py has the details).
Fixtures would not do: the tests build `Tiny` specs in their parametrize lists, at import.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from transformers.convert_slow_tokenizer import bytes_to_unicode

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "Ġ w"]
TOKENS = SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]
BOS_ID, EOS_ID, EOT_ID = 1, 2, 0
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# K-quants have no quantizer in the gguf package; for those the writer writes valid raw blocks:
# random bytes with every float16 scale field (byte offsets below) set to a small finite value.
F16_FIELDS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q2_K: (80, 82)}


@dataclass(frozen=True)
class Tiny:
    arch: str = "llama"
    hidden: int = 256  # every matrix row is 256 long: K-quant blocks span 256 values
    heads: int = 4
    kv_heads: int = 2  # grouped-query, so q and k are permuted with different head counts
    inter: int = 256
    layers: int = 2
    tied: bool = True
    name: str = "tiny"  # general.name; transformers reads a llama file named "mistral" as Mistral
    head_dim_override: int | None = None  # when it is not hidden // heads

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden // self.heads


def tiny_layout(spec: Tiny) -> list[tuple[str, str, tuple[int, ...]]]:
    """`(hf_name, gguf_name, hf_shape)` for every tensor of the tiny model."""
    n_q, n_kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    out = [
        ("model.embed_tokens.weight", "token_embd.weight", (len(TOKENS), spec.hidden)),
        ("model.norm.weight", "output_norm.weight", (spec.hidden,)),
    ]
    if not spec.tied:
        out.append(("lm_head.weight", "output.weight", (len(TOKENS), spec.hidden)))
    for i in range(spec.layers):
        hf, gg = f"model.layers.{i}.", f"blk.{i}."
        out += [
            (hf + "input_layernorm.weight", gg + "attn_norm.weight", (spec.hidden,)),
            (hf + "post_attention_layernorm.weight", gg + "ffn_norm.weight", (spec.hidden,)),
            (hf + "self_attn.q_proj.weight", gg + "attn_q.weight", (n_q, spec.hidden)),
            (hf + "self_attn.k_proj.weight", gg + "attn_k.weight", (n_kv, spec.hidden)),
            (hf + "self_attn.v_proj.weight", gg + "attn_v.weight", (n_kv, spec.hidden)),
            (hf + "self_attn.o_proj.weight", gg + "attn_output.weight", (spec.hidden, n_q)),
            (hf + "mlp.gate_proj.weight", gg + "ffn_gate.weight", (spec.inter, spec.hidden)),
            (hf + "mlp.up_proj.weight", gg + "ffn_up.weight", (spec.inter, spec.hidden)),
            (hf + "mlp.down_proj.weight", gg + "ffn_down.weight", (spec.hidden, spec.inter)),
        ]
        if spec.arch == "qwen2":
            for proj, rows in (("q", n_q), ("k", n_kv), ("v", n_kv)):
                out.append((hf + f"self_attn.{proj}_proj.bias", gg + f"attn_{proj}.bias", (rows,)))
        if spec.arch == "qwen3":  # RMSNorm over each head of q and k
            for proj in ("q", "k"):
                hf_norm = hf + f"self_attn.{proj}_norm.weight"
                out.append((hf_norm, gg + f"attn_{proj}_norm.weight", (spec.head_dim,)))
    return out


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Llama q/k rows (LlamaModel.permute)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def llama_cpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def raw_blocks(qtype: Q, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Valid blocks of a type gguf cannot quantize: random bits, small finite f16 scales."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows * cols // block_values, block_bytes), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scales = np.asarray(rng.uniform(1e-3, 1e-2, size=blocks.shape[0]), dtype=np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // block_values * block_bytes)


@dataclass
class Written:
    """What a tiny file holds, per HF name."""

    exact: dict[str, np.ndarray]  # what the loader must give bit-exactly (gguf's own dequant)
    original: dict[str, np.ndarray]  # the float values before quantization (round-trip check)


def write_gguf(
    path: Path,
    spec: Tiny,
    tensors: list[tuple[str, np.ndarray, Q | None]],
    extra: Callable[[gguf.GGUFWriter], None] | None = None,
) -> None:
    """A GGUF with llama.cpp's metadata for `spec`, a byte-level BPE tokenizer and `tensors`."""
    writer = gguf.GGUFWriter(str(path), spec.arch)
    writer.add_name(spec.name)
    writer.add_block_count(spec.layers)
    writer.add_context_length(512)
    writer.add_embedding_length(spec.hidden)
    writer.add_feed_forward_length(spec.inter)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if spec.arch == "qwen2" else "default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in TOKENS])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_eot_token_id(EOT_ID)
    writer.add_chat_template(CHAT_TEMPLATE)
    if extra is not None:
        extra(writer)
    for name, data, raw_dtype in tensors:
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tiny(
    path: Path,
    spec: Tiny,
    qtype: Q,
    rng: np.random.Generator,
    extra: Callable[[gguf.GGUFWriter], None] | None = None,
) -> Written:
    """Write the tiny model with every matrix in `qtype` (norms and biases F32, as llama.cpp)."""
    tensors: list[tuple[str, np.ndarray, Q | None]] = []
    written = Written({}, {})
    for hf_name, gguf_name, shape in tiny_layout(spec):
        values: np.ndarray | None = rng.standard_normal(shape).astype(np.float32)
        n_head = {"attn_q": spec.heads, "attn_k": spec.kv_heads}.get(gguf_name.split(".")[-2])
        if spec.arch not in ("llama", "mistral") or len(shape) == 1:
            n_head = None
        assert values is not None
        on_disk = values if n_head is None else llama_cpp_permute(values, n_head)
        file_type = Q.F32 if len(shape) == 1 else qtype
        try:
            data = gguf.quants.quantize(on_disk, file_type)
        except NotImplementedError:  # no quantizer: random raw blocks *are* the model
            data = raw_blocks(file_type, (shape[0], shape[1]), rng)
            values = None
        stored = gguf.quants.dequantize(data, file_type).astype(np.float32).reshape(shape)
        written.exact[hf_name] = stored if n_head is None else llama_cpp_unpermute(stored, n_head)
        written.original[hf_name] = written.exact[hf_name] if values is None else values
        raw_dtype = None if file_type in (Q.F32, Q.F16) else file_type
        tensors.append((gguf_name, data, raw_dtype))
    write_gguf(path, spec, tensors, extra)
    return written


# ---------------------------------------------------------------------------------------------
# Any architecture: a (random) transformers model written as llama.cpp's converter writes it
# ---------------------------------------------------------------------------------------------

# transformers (v5) keeps a layer's experts stacked: gate_up_proj [E, 2I, H] (gate rows first)
# and down_proj [E, H, I]; llama.cpp stores ffn_gate_exps / ffn_up_exps [E, I, H] and
# ffn_down_exps [E, H, I].
_HF_EXPERTS = re.compile(
    r"model\.layers\.(?P<bid>\d+)\.mlp\.experts\.(?P<w>gate_up_proj|down_proj)"
)


def gguf_tensors_from_hf(
    state: dict[str, np.ndarray], arch: str, num_layers: int, tied: bool
) -> list[tuple[str, np.ndarray]]:
    """`(gguf_name, values)` for a transformers state dict, with llama.cpp's fix-ups: Gemma's
    norms stored plus one, Qwen2-MoE's shared-expert gate as a vector, experts stacked."""
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_id, num_layers)
    out: list[tuple[str, np.ndarray]] = []
    for hf_name, values in state.items():
        expert = _HF_EXPERTS.fullmatch(hf_name)
        if expert is not None:
            block = f"blk.{expert['bid']}."
            if expert["w"] == "gate_up_proj":
                gate, up = np.split(values, 2, axis=1)
                out += [(block + "ffn_gate_exps.weight", gate), (block + "ffn_up_exps.weight", up)]
            else:
                out.append((block + "ffn_down_exps.weight", values))
            continue
        if hf_name == "lm_head.weight" and tied:
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, hf_name
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            values = values + 1.0
        if gguf_name.endswith("ffn_gate_inp_shexp.weight"):
            values = values.reshape(-1)
        out.append((gguf_name, values))
    return out


def write_hf_model(
    path: Path, arch: str, config: Any, state: dict[str, np.ndarray], quantize: bool = True
) -> None:
    """A GGUF of `arch` (llama.cpp's general.architecture) holding a transformers model:
    llama.cpp's hyper-parameter keys from `config`, the byte-level BPE tokenizer above, the
    matrices as Q8_0 where their rows allow it (F32 otherwise, or with quantize=False)."""
    tied = bool(config.tie_word_embeddings)
    tensors: list[tuple[str, np.ndarray, Q | None]] = []
    for name, values in gguf_tensors_from_hf(state, arch, config.num_hidden_layers, tied):
        values = np.ascontiguousarray(values, dtype=np.float32)
        if quantize and values.ndim >= 2 and values.shape[-1] % 32 == 0:
            tensors.append((name, gguf.quants.quantize(values, Q.Q8_0), Q.Q8_0))
        else:
            tensors.append((name, values, None))

    def hyper_parameters(writer: gguf.GGUFWriter) -> None:
        # transformers' config defaults may name a pad id past this small vocabulary (Phi-3)
        writer.add_pad_token_id(EOT_ID)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        if getattr(config, "sliding_window", None):
            writer.add_sliding_window(config.sliding_window)
        experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", 0)
        if experts:
            writer.add_expert_count(experts)
            writer.add_expert_used_count(config.num_experts_per_tok)
        if getattr(config, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        if getattr(config, "shared_expert_intermediate_size", None):
            writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)

    spec = Tiny(
        arch=arch,
        hidden=config.hidden_size,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        inter=config.intermediate_size,
        layers=config.num_hidden_layers,
        tied=tied,
        head_dim_override=config.head_dim,
    )
    write_gguf(path, spec, tensors, hyper_parameters)
