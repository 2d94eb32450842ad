"""GGUF checkpoints: config, tokenizer and dequantized weights from one llama.cpp file.

A GGUF file carries everything a HF model directory would: hyper-parameters, the tokenizer
(vocabulary, merges, special ids, chat template) and the tensors, most of them quantized in
ggml blocks. This module turns it into the pieces the engine's loader consumes:

    ckpt = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    ckpt.config        # LlamaConfig, as AutoConfig.from_pretrained(..., gguf_file=) builds it
    ckpt.tokenizer     # fast tokenizer with the file's chat template
    for name, tensor in ckpt.weights(torch.bfloat16):  # HF names and layout, one at a time
        ...

With quantization="gguf" the loader asks for `weights_keeping_4bit(dtype, names)` instead:
Q4_0 / Q4_1 / Q4_K matrices among `names` then come as their raw blocks (GGUFBlocks) and
are kept 4-bit (layers.quantization.gguf); everything else is dequantized as above.

Config and tokenizer come from transformers' GGUF support, so they match what
`from_pretrained(..., gguf_file=)` gives. Tensors are read through `gguf.GGUFReader`, which
memory-maps the file, and dequantized one at a time with `gguf.quants.dequantize`: peak memory is
one tensor in float32, not the whole model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from gguf import (
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFReader,
    ReaderTensor,
    get_tensor_name_map,
)
from gguf.quants import dequantize
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    LlamaTensorProcessor,
    TensorProcessor,
)

from pinnace.runtime.layers.quantization.config import GGUF_INT4_TYPES
from pinnace.runtime.layers.quantization.gguf import GGUFBlocks
from pinnace.runtime.models.registry import ModelEntry, entry_for_model_type, gguf_entries

Q = GGMLQuantizationType
# Stands for the expert index in the HF name of a stacked expert tensor (one per expert).
EXPERT_SLOT = "{expert}"
# llama.cpp's stacked experts -> the per-expert HF module each expert's slice is.
GGUF_EXPERTS = {
    "ffn_gate_exps": "gate_proj",
    "ffn_up_exps": "up_proj",
    "ffn_down_exps": "down_proj",
}
_STACKED_EXPERTS = re.compile(
    r"(?P<prefix>model\.layers\.(?P<block>\d+)\.mlp\.experts)\.(?P<w>gate_up_proj|down_proj)"
)
# Q5_0/Q5_1 are here because llama.cpp falls back to them inside K-quant files whenever a row
# length is not a multiple of 256 (Qwen2-0.5B's 896 is), so a "Q4_K_M" file contains them.
SUPPORTED_TENSOR_TYPES = frozenset(
    {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K}
)


@dataclass
class GGUFCheckpoint:
    """A GGUF file opened for loading: metadata parsed, tensors still on disk (memory-mapped)."""

    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    generation_eos_token_ids: list[int]
    path: str
    # HF parameter name -> ggml type name as stored ("Q4_1", "F32", ...), for logs and for a
    # loader that wants to keep some weights quantized.
    tensor_types: dict[str, str] = field(repr=False)
    _reader: GGUFReader = field(repr=False)
    _hf_names: dict[str, str] = field(repr=False)  # GGUF tensor name -> HF parameter name
    _processor: TensorProcessor = field(repr=False)

    def weights(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(hf_name, tensor)` in file order, dequantized to `dtype`, in HF layout.

        Each tensor is a fresh CPU tensor the caller owns (never a view of the mapped file).
        `lm_head.weight` appears only when the file has its own output matrix (untied). A
        stacked expert tensor comes one expert at a time, under the per-expert HF name
        (`...mlp.experts.<j>.gate_proj.weight`).
        """
        _check_float(dtype)
        for tensor in self._reader.tensors:
            yield from self._named(tensor, dtype)

    def _named(
        self, tensor: ReaderTensor, dtype: torch.dtype
    ) -> Iterator[tuple[str, torch.Tensor]]:
        name = self._hf_names[tensor.name]
        if EXPERT_SLOT not in name:
            yield name, self._dequantized(tensor, tensor.data, dtype)
            return
        # Stacked [E, out, in]: dequantized one expert at a time (peak memory one expert in
        # float32, not E), each its own tensor rather than a view of the stack.
        for j in range(tensor.data.shape[0]):
            expert = self._dequantized(tensor, tensor.data[j], dtype)  # [out, in]
            yield name.replace(EXPERT_SLOT, str(j)), expert

    def weights_keeping_4bit(
        self, dtype: torch.dtype, keep: Collection[str]
    ) -> Iterator[tuple[str, torch.Tensor | GGUFBlocks]]:
        """Like `weights`, but the tensors named in `keep` that are stored as Q4_0, Q4_1 or
        Q4_K come as their raw blocks (rows in HF order), to be kept 4-bit."""
        _check_float(dtype)
        for tensor in self._reader.tensors:
            name = self._hf_names[tensor.name]
            if name in keep and tensor.tensor_type.name in GGUF_INT4_TYPES:
                yield name, self._blocks(tensor)
            else:  # stacked experts are never kept 4-bit: they are not linear layers
                yield from self._named(tensor, dtype)

    def _dequantized(
        self, tensor: ReaderTensor, data: np.ndarray, dtype: torch.dtype
    ) -> torch.Tensor:
        """`data` (the tensor's blocks, or one expert's) as a fresh `dtype` tensor."""
        # float32 numpy in torch order ([out_features, in_features] for a linear weight)
        values = dequantize(data, tensor.tensor_type)
        # Undo llama.cpp's q/k row interleaving; transformers' own code, so the result is
        # bit-identical to `from_pretrained(..., gguf_file=)`.
        values = self._processor.process(weights=values, name=tensor.name).weights
        # F32 tensors are still read-only views of the mapped file: copy those (only).
        values = np.require(values, requirements=["C", "W"])
        return torch.from_numpy(values).to(dtype)

    def _blocks(self, tensor: ReaderTensor) -> GGUFBlocks:
        # [rows, bytes per row]: the q/k row interleaving is undone on whole rows of blocks.
        raw = self._processor.process(weights=np.asarray(tensor.data), name=tensor.name).weights
        raw = np.require(raw, requirements=["C", "W"])  # a copy, not the mapped file
        columns = int(tensor.shape[0])  # ggml lists dimensions innermost first
        return GGUFBlocks(tensor.tensor_type.name, raw, (raw.shape[0], columns))


def _check_float(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise ValueError(f"GGUF weights dequantize to a floating dtype, not {dtype}.")


def is_gguf(path: str) -> bool:
    """True for a path ending in `.gguf` (existing or not) or a directory with exactly one."""
    if os.path.isdir(path):
        return len(_gguf_files_in(path)) == 1
    return path.lower().endswith(".gguf")


def load_gguf(path: str) -> GGUFCheckpoint:
    """Open a GGUF file (or a directory holding one) and check it can be loaded.

    Every check happens here, before any weight is read: an unsupported architecture, tensor
    type, RoPE scaling or tensor name raises `ValueError`; a missing file `FileNotFoundError`.
    """
    file = _resolve_file(path)
    reader = _open_reader(file)
    architecture = _read_field(reader, "general.architecture")
    entries = gguf_entries()
    if architecture not in entries:
        raise ValueError(
            f"{file}: GGUF architecture {architecture!r} is not supported. "
            f"Supported architectures: {', '.join(entries)}."
        )
    _check_loadable(reader, architecture, file)

    directory, name = os.path.split(os.path.abspath(file))
    config = AutoConfig.from_pretrained(directory, gguf_file=name, local_files_only=True)
    _expert_sizes_from_file(config, reader, architecture)
    # transformers leaves `architectures` unset for GGUF; the engine picks its class from it.
    # Its model type decides the class (a llama-architecture file named "Mistral" is mistral).
    entry = entry_for_model_type(config.model_type)
    config.architectures = [entry.architecture]
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)

    hf_names = _map_tensor_names(reader, config, entry, file)
    # transformers' own per-architecture fix-ups (Gemma's norms are stored plus one).
    processor_cls = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    if entry.gguf_qk_permuted:
        processor_cls = LlamaTensorProcessor
    processor = processor_cls(config=config.to_dict())
    return GGUFCheckpoint(
        config=config,
        tokenizer=tokenizer,
        generation_eos_token_ids=_eos_token_ids(config, reader),
        path=file,
        tensor_types={hf_names[t.name]: t.tensor_type.name for t in reader.tensors},
        _reader=reader,
        _hf_names=hf_names,
        _processor=processor,
    )


def _gguf_files_in(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.lower().endswith(".gguf"))


def _resolve_file(path: str) -> str:
    if os.path.isdir(path):
        files = _gguf_files_in(path)
        if not files:
            raise FileNotFoundError(f"No .gguf file in directory {path}.")
        if len(files) > 1:
            raise ValueError(
                f"Directory {path} holds several GGUF files ({', '.join(files)}); "
                "pass the path of the one to load."
            )
        return os.path.join(path, files[0])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return path


def _open_reader(file: str) -> GGUFReader:
    try:
        return GGUFReader(file)
    except (ValueError, IndexError) as error:  # bad magic, truncated header, empty file
        raise ValueError(f"{file} is not a readable GGUF file: {error}") from error


def _read_field(reader: GGUFReader, key: str) -> Any:
    """A metadata value, or None when the file does not have the key."""
    found = reader.get_field(key)
    return None if found is None else found.contents()


def _expert_sizes_from_file(config: PretrainedConfig, reader: GGUFReader, arch: str) -> None:
    """transformers' GGUF config leaves Qwen-MoE's expert sizes at the flagship model's
    defaults (1408 / 5632 / 768); llama.cpp writes the real ones, so read those."""
    sizes = {
        "expert_feed_forward_length": "moe_intermediate_size",
        "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
    }
    for key, attribute in sizes.items():
        value = _read_field(reader, f"{arch}.{key}")
        if value is not None and hasattr(config, attribute):
            setattr(config, attribute, int(value))


def _check_loadable(reader: GGUFReader, architecture: str, file: str) -> None:
    """Reject files whose weights or metadata this loader would read wrongly."""
    if (_read_field(reader, "split.count") or 1) > 1:
        raise ValueError(
            f"{file} is one part of a split GGUF; merge the parts first "
            "(llama-gguf-split --merge) and load the merged file."
        )
    bad = sorted({t.tensor_type for t in reader.tensors} - SUPPORTED_TENSOR_TYPES)
    if bad:
        names = ", ".join(t.name for t in bad)
        supported = ", ".join(t.name for t in sorted(SUPPORTED_TENSOR_TYPES))
        raise ValueError(
            f"{file} has tensors of type {names}, which cannot be loaded. "
            f"Supported tensor types: {supported}."
        )
    # transformers' GGUF config ignores RoPE scaling; loading anyway would give a model that is
    # silently wrong at every position, so refuse instead.
    scaling = _read_field(reader, f"{architecture}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{file} uses {scaling!r} RoPE scaling, which is not supported yet.")
    tensor_names = {t.name for t in reader.tensors}
    if architecture == "llama" and "blk.0.ffn_gate_inp.weight" in tensor_names:
        raise ValueError(
            f"{file} is a Mixtral-style mixture of experts written as GGUF architecture "
            "'llama', which transformers' GGUF reader takes for a dense Llama (it has no "
            "config for its experts), so it cannot be loaded from GGUF; load the "
            "safetensors checkpoint instead."
        )
    if "rope_factors_long.weight" in tensor_names:
        raise ValueError(
            f"{file} uses LongRoPE (Phi-3 128k-style rope factors), which transformers' GGUF "
            "reader does not configure; load the safetensors checkpoint instead."
        )
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(
            f"{file} stores per-dimension RoPE frequencies (Llama-3.1-style rope scaling), "
            "which is not supported yet."
        )


def _map_tensor_names(
    reader: GGUFReader, config: PretrainedConfig, entry: ModelEntry, file: str
) -> dict[str, str]:
    """GGUF tensor name -> HF parameter name, checked both ways against the HF model class.

    The HF names come from the model class itself (built on the meta device, so no memory),
    and gguf's own name table translates them, as transformers' GGUF loader does.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    arch_id = next(k for k, v in MODEL_ARCH_NAMES.items() if v == entry.gguf_names)
    name_map = get_tensor_name_map(arch_id, config.num_hidden_layers)
    expected: dict[str, str] = {}
    for hf_name in model.state_dict():
        stacked = _STACKED_EXPERTS.fullmatch(hf_name)
        if stacked is not None:
            # transformers (v5) stacks a layer's experts as gate_up_proj and down_proj;
            # llama.cpp stores gate, up and down apart. Each becomes the per-expert HF
            # names (legacy checkpoints' `experts.<j>.gate_proj.weight`), which the models
            # load; the layer's three entries are made once, at its down_proj.
            if stacked["w"] == "down_proj":
                for gguf_leaf, hf_leaf in GGUF_EXPERTS.items():
                    name = f"{stacked['prefix']}.{EXPERT_SLOT}.{hf_leaf}.weight"
                    expected[f"blk.{stacked['block']}.{gguf_leaf}.weight"] = name
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is not None:
            expected[gguf_name] = hf_name

    in_file = [t.name for t in reader.tensors]
    unknown = [n for n in in_file if n not in expected]
    if unknown:
        raise ValueError(
            f"{file} has tensors that {type(model).__name__} has no parameter for: "
            f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}."
        )
    missing = set(expected.values()) - {expected[n] for n in in_file}
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")  # tied: the embedding matrix serves as the output
    if missing:
        raise ValueError(f"{file} lacks tensors for: {', '.join(sorted(missing))}.")
    return {n: expected[n] for n in in_file}


def _eos_token_ids(config: PretrainedConfig, reader: GGUFReader) -> list[int]:
    """The config's EOS plus llama.cpp's end-of-turn / end-of-message ids, deduplicated."""
    eos = config.eos_token_id
    ids: list[int] = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        token_id = _read_field(reader, key)
        if token_id is not None and int(token_id) not in ids:
            ids.append(int(token_id))
    return ids
