"""Open a checkpoint (HF folder with safetensors, or a GGUF file) and build the model."""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from pinnace.runtime.distributed.parallel_state import ParallelGroup
from pinnace.runtime.distributed.pipeline_parallel import Stage, prune_to_stage
from pinnace.runtime.distributed.tensor_parallel import (
    LazyTensor,
    ShardSlicer,
    TPShape,
    install_collectives,
    rank_config,
    row_parallel_amax,
)
from pinnace.runtime.layers.linear import can_pack, pack_linears
from pinnace.runtime.layers.packed import to_our_module
from pinnace.runtime.layers.quantization.config import (
    GGUF_FLOAT_TYPES,
    GGUF_INT4_TYPES,
    QuantizationConfig,
)
from pinnace.runtime.layers.quantization.convert import quantize_experts, quantize_linears
from pinnace.runtime.layers.quantization.loading import (
    LinearShell,
    QuantizedWeightRouter,
    install_shells,
)
from pinnace.runtime.lora.layers import LoRASlotsConfig, install_lora_layers
from pinnace.runtime.lora.targets import model_spec
from pinnace.runtime.models.registry import backbone_of, resolve_model_class

if TYPE_CHECKING:
    from pinnace.runtime.models.gguf_loader import GGUFCheckpoint

logger = logging.getLogger(__name__)

WeightIterator = Iterator[tuple[str, torch.Tensor]]


@dataclass
class Checkpoint:
    """Everything needed to build a model, before any weight is read."""

    path: str
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: list[int]
    weights: Callable[[torch.dtype], WeightIterator]  # HF-named tensors, lazily
    checkpoint_dtype: torch.dtype | None  # as stored (None: quantized / unknown)
    format: str  # "safetensors" or "gguf"
    gguf: GGUFCheckpoint | None = None  # the opened file, for loading its blocks as they are
    # safetensors only: the same names as LazyTensors, read in part (a tensor-parallel
    # rank reads its shard of each tensor, never the whole)
    lazy_weights: Callable[[torch.dtype], Iterator[tuple[str, LazyTensor]]] | None = None


def open_checkpoint(path: str, chat_template: str | None = None) -> Checkpoint:
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist (no hub downloads here).")
    ckpt = _open_gguf(path) if _is_gguf(path) else _open_hf_folder(path)
    if chat_template is not None:
        ckpt.tokenizer.chat_template = chat_template
    return ckpt


def _is_gguf(path: str) -> bool:
    if os.path.isfile(path):
        return path.endswith(".gguf")
    return bool(glob.glob(os.path.join(path, "*.gguf"))) and not glob.glob(
        os.path.join(path, "*.safetensors")
    )


def _open_gguf(path: str) -> Checkpoint:
    from pinnace.runtime.models.gguf_loader import load_gguf

    gguf = load_gguf(path)
    return Checkpoint(
        path=path,
        config=gguf.config,
        tokenizer=gguf.tokenizer,
        eos_token_ids=list(gguf.generation_eos_token_ids),
        weights=gguf.weights,
        checkpoint_dtype=None,
        format="gguf",
        gguf=gguf,
    )


def _open_hf_folder(path: str) -> Checkpoint:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} has no config.json: not a Hugging Face model folder.")
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    files = _safetensors_files(path)
    return Checkpoint(
        path=path,
        config=config,
        tokenizer=tokenizer,
        eos_token_ids=_eos_token_ids(path, config, tokenizer),
        weights=lambda dtype: _iter_safetensors(files, dtype),
        lazy_weights=lambda dtype: _iter_lazy_safetensors(files, dtype),
        checkpoint_dtype=getattr(config, "dtype", None) or getattr(config, "torch_dtype", None),
        format="safetensors",
    )


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, s) for s in shards]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"shards listed in {index} are missing: {missing}")
        return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path!r}.")
    return files


# Quantization metadata keeps its stored precision: scales feed an exact dequantization.
_KEEP_STORED_DTYPE = (".scales", ".weight_scale", ".weight_scale_inv", ".input_scale")


def _iter_safetensors(files: list[str], dtype: torch.dtype) -> WeightIterator:
    """Float tensors converted to `dtype`; integer codes, FP8 codes and scales as stored."""
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                tensor = f.get_tensor(name)
                is_code = not tensor.is_floating_point() or tensor.element_size() == 1
                if not is_code and not name.endswith(_KEEP_STORED_DTYPE):
                    tensor = tensor.to(dtype)
                yield name, tensor


def _iter_lazy_safetensors(
    files: list[str], dtype: torch.dtype
) -> Iterator[tuple[str, LazyTensor]]:
    """As _iter_safetensors, but nothing is read until the consumer reads a range."""
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                keep = name.endswith(_KEEP_STORED_DTYPE)
                yield name, LazyTensor(f, name, None if keep else dtype)


def _eos_token_ids(
    path: str, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase
) -> list[int]:
    """EOS ids to stop on: generation_config.json first (it may list several)."""
    candidates: object = None
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            candidates = json.load(f).get("eos_token_id")
    if candidates is None:
        candidates = getattr(config, "eos_token_id", None)
    if candidates is None:
        candidates = tokenizer.eos_token_id
    if candidates is None:
        return []
    values: list = candidates if isinstance(candidates, list) else [candidates]
    return [int(c) for c in values]


def resolve_dtype(dtype: str | torch.dtype, ckpt: Checkpoint, device: torch.device) -> torch.dtype:
    """ "auto": the checkpoint's dtype (bfloat16 when unknown); float16 becomes bfloat16 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    names.update({"float": torch.float32, "half": torch.float16})
    if dtype in names:
        return names[dtype]
    if dtype != "auto":
        raise ValueError(f"dtype {dtype!r} is not one of auto, float32, bfloat16, float16.")
    stored = ckpt.checkpoint_dtype
    if isinstance(stored, str):
        stored = names.get(stored)
    if not isinstance(stored, torch.dtype) or stored not in names.values():
        stored = torch.bfloat16
    if stored == torch.float16 and device.type == "cpu":
        return torch.bfloat16
    return stored


def build_model(
    ckpt: Checkpoint,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    quantization: QuantizationConfig | None = None,
    lora: LoRASlotsConfig | None = None,
    tp: tuple[ParallelGroup, TPShape] | None = None,
    stage: Stage | None = None,
) -> nn.Module:
    """The one place a model is constructed, in this order:

        1. shells    the architecture on the meta device (no random init); layers the
                     checkpoint stores quantized become shells that own only their bias
        2. load      materialise, stream the weights in; a router keeps quantized parts
        3. quantize  int8 / fp8 at load, or gguf's types with no exact 4-bit form
        4. pack      bfloat16 linears pre-packed for oneDNN (CPU)
        5. LoRA      adapter slots wrap the final base layers of the declared targets

    A quantized model is assembled on the CPU and moved to `device` after step 3, so a GPU
    only ever holds the quantized weights. With `tp` (a tensor-parallel rank), step 1 builds
    the rank's shapes, step 2 reads only the rank's shard of each tensor, and a last step
    installs the collectives (distributed/tensor_parallel.py). With `stage` (a pipeline
    stage), step 1 prunes the modules other stages own and step 2 reads only the stage's
    tensors (distributed/pipeline_parallel.py).
    """
    architectures = getattr(ckpt.config, "architectures", None) or ["<none>"]
    cls = resolve_model_class(architectures)
    _check_expert_quantization(cls, quantization)
    headless = backbone_of(architectures[0]) is not None
    if headless:
        # A `*Model` checkpoint has no LM head: tie it to the embedding so nothing expects
        # one (pooling never computes logits; generation is refused for these).
        ckpt.config.tie_word_embeddings = True
    config = ckpt.config if tp is None else rank_config(ckpt.config, tp[1])
    with torch.device("meta"):
        model: Any = cls(config, max_positions)
        if stage is not None:
            prune_to_stage(model, stage)
            model.pp_stage = stage
    quant = quantization
    shells = install_shells(model) if quant is not None and quant.from_checkpoint else {}
    load_device = device if quant is None else torch.device("cpu")
    model = model.to(dtype=dtype).to_empty(device=load_device)
    model.tie_weights()
    if tp is not None:
        _zero_padded_vocab(model)
        model.tp_slicer = ShardSlicer(tp[1])
    _load(model, ckpt, dtype, device, quant, shells, headless)
    if quant is not None:
        row_amax = row_parallel_amax(model, tp[0]) if tp is not None else None
        _quantize_float_layers(model, ckpt, quant, device, row_amax)
        model.to(device)
    model.prepare(device)
    if can_pack(device, dtype):
        pack_linears(model)  # the layers still in bfloat16
    if lora is not None:
        install_lora_layers(model, model_spec(model), lora, dtype, device)
    if tp is not None and tp[1].tp_size > 1:  # one rank per stage: nothing to combine
        install_collectives(model, *tp)
    return cast(nn.Module, model.eval())


def _zero_padded_vocab(model: nn.Module) -> None:
    """A rank's vocabulary rows past the real vocabulary get no checkpoint rows: zeros."""
    with torch.no_grad():
        for path, module in model.named_modules():
            if path.rpartition(".")[2] in ("embed_tokens", "lm_head") and hasattr(
                module, "weight"
            ):  # not another pipeline stage's
                module.weight.zero_()


def _check_expert_quantization(cls: type[nn.Module], quant: QuantizationConfig | None) -> None:
    """A GPTQ, AWQ or FP8 checkpoint quantizes each expert as its own linear layer; our MoE
    models keep a layer's experts stacked ([E, out, in]), which those loaders cannot fill.
    Refused before any weight is read. (int8 / fp8 at load quantize the stacked experts;
    a GGUF's expert blocks load as floats.)"""
    if quant is None or quant.checkpoint is None or not getattr(cls, "expert_params_mapping", {}):
        return
    raise ValueError(
        f"{quant.method} checkpoints of {cls.__name__} cannot be loaded: its experts run "
        f"stacked per layer, and {quant.method} stores each expert as its own quantized "
        "linear layer, which is supported for dense layers only. Load the float "
        "checkpoint, with quantization='int8' or 'fp8' to quantize the experts at load."
    )


def _load(
    model: Any,
    ckpt: Checkpoint,
    dtype: torch.dtype,
    device: torch.device,
    quant: QuantizationConfig | None,
    shells: dict[str, LinearShell],
    headless: bool = False,
) -> None:
    weights: Iterable[tuple[str, Any]] = _weight_stream(ckpt, dtype, quant)
    parallel = getattr(model, "tp_slicer", None) or getattr(model, "pp_stage", None)
    if parallel is not None and ckpt.lazy_weights is not None:
        weights = ckpt.lazy_weights(dtype)
    if headless:  # the body's own names: embed_tokens, layers.<i>..., norm
        weights = ((n if n.startswith("model.") else f"model.{n}", t) for n, t in weights)
    weights = tqdm(weights, desc="Loading weights", unit=" tensors", leave=False)
    router = None
    if quant is not None and shells:
        router = QuantizedWeightRouter(model, shells, quant, dtype, device)
        weights = router.route(weights)
    loaded = model.load_weights(weights)
    missing = model.expected_weights() - loaded
    if missing:
        raise ValueError(f"checkpoint {ckpt.path!r} lacks weights: {sorted(missing)[:8]}")
    if router is not None:
        router.finish()


def _weight_stream(
    ckpt: Checkpoint, dtype: torch.dtype, quant: QuantizationConfig | None
) -> Iterable[tuple[str, Any]]:
    if quant is None or quant.method != "gguf" or ckpt.gguf is None:
        return ckpt.weights(dtype)
    return ckpt.gguf.weights_keeping_4bit(dtype, _gguf_kept_4bit(ckpt.gguf))


def _gguf_kept_4bit(gguf: GGUFCheckpoint) -> set[str]:
    """Linear weights stored in a 4-bit ggml type (the embedding is looked up, not kept;
    stacked experts are not linear layers: int8 experts, _gguf_quantized_experts)."""
    from pinnace.runtime.models.gguf_loader import EXPERT_SLOT

    return {
        name
        for name, kind in gguf.tensor_types.items()
        if kind in GGUF_INT4_TYPES
        and name != "model.embed_tokens.weight"
        and EXPERT_SLOT not in name
    }


def _gguf_quantized_experts(gguf: GGUFCheckpoint) -> set[str]:
    """Paths of the FusedExperts modules whose stacked tensors are stored in a quantized
    ggml type ("model.layers.0.mlp.experts.{expert}.gate_proj.weight" -> its prefix)."""
    from pinnace.runtime.models.gguf_loader import EXPERT_SLOT

    return {
        name.partition(f".{EXPERT_SLOT}.")[0]
        for name, kind in gguf.tensor_types.items()
        if kind not in GGUF_FLOAT_TYPES and EXPERT_SLOT in name
    }


def _quantize_float_layers(
    model: nn.Module,
    ckpt: Checkpoint,
    quant: QuantizationConfig,
    device: torch.device,
    row_amax: dict[str, torch.Tensor] | None = None,
) -> None:
    """int8 / fp8: every linear layer, embedding and expert stack (the LM head and the
    token embedding only with `quant.lm_head`). gguf: the layers stored
    in a ggml type with no exact 4-bit form (Q8_0, Q5_*, Q6_K), and every quantized expert
    stack, as int8."""
    if quant.quantizes_at_load:
        quantize_linears(
            model, quant.method, device, row_amax=row_amax, keep_head=not quant.lm_head
        )
    elif quant.method == "gguf" and ckpt.gguf is not None:
        kept = _gguf_kept_4bit(ckpt.gguf)
        mapping = type(model).packed_modules_mapping  # type: ignore[attr-defined]
        only = {
            to_our_module(mapping, name.rpartition(".")[0])[0]
            for name, kind in ckpt.gguf.tensor_types.items()
            if kind not in GGUF_FLOAT_TYPES and name not in kept
        }
        quantize_linears(model, "int8", device, only)
        # Stacked experts stored quantized: int8 experts too (never kept 4-bit: they are
        # not linear layers), so a quantized MoE file is not silently served in floats.
        quantize_experts(model, "int8", device, _gguf_quantized_experts(ckpt.gguf))
