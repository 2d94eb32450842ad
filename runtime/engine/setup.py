"""Build the tensor side of an engine from its config: model, KV cache, runner."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pinnace.runtime.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from pinnace.runtime.distributed.model_split import check_model_split, check_split_support
from pinnace.runtime.distributed.parallel_state import ParallelGroup
from pinnace.runtime.distributed.pipeline_parallel import (
    Stage,
    StageLink,
    stage_of,
)
from pinnace.runtime.distributed.tensor_parallel import rank_config, tp_shape
from pinnace.runtime.layers.attention import Attention, AttentionBackend, get_attention_backend
from pinnace.runtime.layers.attention.fp8_kv import resolve_kv_cache_dtype
from pinnace.runtime.layers.attention.layer import attention_spec
from pinnace.runtime.layers.linear import weight_bytes as resident_weight_bytes
from pinnace.runtime.layers.quantization.config import resolve_quantization
from pinnace.runtime.lora.layers import LoRASlotsConfig
from pinnace.runtime.models.loader import Checkpoint, build_model, open_checkpoint, resolve_dtype
from pinnace.runtime.spec_decode.draft_model_proposer import DraftModelProposer
from pinnace.runtime.spec_decode.ngram_proposer import NgramProposer
from pinnace.runtime.spec_decode.proposer import Proposer
from pinnace.runtime.worker.cuda_graphs import (
    capture_decode_graphs,
    capture_sizes,
    graph_memory_estimate,
)
from pinnace.runtime.worker.input_batch import InputBatch
from pinnace.runtime.worker.kv_cache import allocate_kv_caches, block_bytes, kv_geometry
from pinnace.runtime.worker.model_runner import ModelRunner
from pinnace.runtime.worker.sampler import Sampler

logger = logging.getLogger("pinnace.runtime")

GiB = 1024**3


@dataclass
class EngineParts:
    checkpoint: Checkpoint
    device: torch.device
    dtype: torch.dtype
    runner: ModelRunner
    num_blocks: int
    max_model_len: int
    weight_bytes: int
    quantization: str | None = None  # the method in use (None: float weights)
    kv_cache_dtype: torch.dtype | None = None  # None: the model dtype
    sliding_window: int | None = None  # the window when every layer has one (KV released)
    rank_weight_bytes: list[int] | None = None  # every rank's weight bytes, in rank order


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available.")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported; use cpu or cuda.")
    return device


def build_engine_parts(config: EngineConfig, group: ParallelGroup | None = None) -> EngineParts:
    """This rank's model, KV cache and runner (`group`: the rank group when world_size > 1)."""
    device = resolve_device(config.device)
    if group is None and config.num_threads is not None:
        torch.set_num_threads(config.num_threads)  # ranks > 1: the executor splits them
    if group is not None and device.type == "cuda":
        device = torch.device("cuda", group.rank % config.local_world_size)
    ckpt = open_checkpoint(config.model, config.chat_template)
    check_model_split(ckpt.config, config.tensor_parallel_size, config.pipeline_parallel_size)
    draft = _open_draft(config, ckpt)
    dtype = resolve_dtype(config.dtype, ckpt, device)
    quant = resolve_quantization(
        config.quantization, ckpt.config, ckpt.format, config.quantize_lm_head
    )
    model_max = int(getattr(ckpt.config, "max_position_embeddings", 0) or 2048)
    max_model_len = config.max_model_len or model_max
    lora = LoRASlotsConfig(config.max_loras, config.max_lora_rank) if config.enable_lora else None
    tp = stage = None
    kv_config = ckpt.config  # the rank's KV heads: what its cache holds
    if group is not None:
        check_split_support(config, ckpt, quant)
        if group.pp_size > 1:
            stage = stage_of(ckpt.config, group.pp_rank, group.pp_size)
        shape = tp_shape(ckpt.config, group.tp_rank, group.tp_size)
        tp = (group, shape)
        kv_config = rank_config(ckpt.config, shape)
    model = build_model(ckpt, dtype, device, max(max_model_len, model_max), quant, lora, tp, stage)
    weight_bytes = resident_weight_bytes(model)  # with the bf16 GEMV's plain copies
    rank_weight_bytes = [weight_bytes] if group is None else group.gather_ints(weight_bytes)
    kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, dtype)
    backend = get_attention_backend(
        config.attention_backend, device, attention_spec(model, dtype, kv_dtype)
    )
    kv_layers = stage.layers if stage is not None else None  # a stage caches its layers'
    per_block = block_bytes(kv_config, config.block_size, kv_dtype, backend, kv_layers)
    draft_model = draft_backend = None
    if draft is not None:  # built before the KV budget is measured; its layers get KV too
        draft_model = _build_draft(config, draft, dtype, device, max(max_model_len, model_max))
        draft_backend = get_attention_backend(
            config.attention_backend, device, attention_spec(draft_model, dtype, kv_dtype)
        )
        per_block += block_bytes(draft.config, config.block_size, kv_dtype, draft_backend)
    graph_sizes, graph_bytes = _cuda_graph_plan(config, ckpt, device, backend, group)
    num_blocks = _num_kv_blocks(config, per_block, device, graph_bytes)
    if group is not None:
        num_blocks = group.min_int(num_blocks)  # one block table for every rank
    capacity = num_blocks * config.block_size
    if max_model_len > capacity:
        if config.max_model_len is not None:
            raise ValueError(
                f"max_model_len={max_model_len} needs more KV cache than the budget holds "
                f"({capacity} tokens in {num_blocks} blocks); raise the KV budget or lower "
                "max_model_len."
            )
        logger.warning(
            "max_model_len lowered from %d to the KV capacity %d", max_model_len, capacity
        )
        max_model_len = capacity
    # With CUDA graphs, one more block that no request owns: padded decode rows write there.
    num_allocated = num_blocks + (1 if graph_sizes else 0)
    kv_caches = allocate_kv_caches(
        kv_config, num_allocated, config.block_size, kv_dtype, device, backend, kv_layers
    )
    sampler = Sampler(ckpt.eos_token_ids, config.seed, device)
    max_tokens = config.resolved_max_num_batched_tokens
    lookahead = config.speculative.num_speculative_tokens if config.speculative else 0
    input_batch = InputBatch(
        config.max_num_seqs,
        max_tokens + config.max_num_seqs,  # room for a padded decode step
        -(-(max_model_len + lookahead) // config.block_size) + 1,
        config.block_size,
        device,
        pad_slot=num_blocks * config.block_size,
    )
    runner = ModelRunner(
        model, kv_caches, config.block_size, backend, sampler, device, max_tokens, input_batch
    )
    runner.is_driver = group is None or group.is_driver
    if group is not None and group.pp_size > 1:
        hidden_size, vocab = int(ckpt.config.hidden_size), int(ckpt.config.vocab_size)
        runner.pipeline = StageLink(group, hidden_size, vocab, dtype, device)
    if graph_sizes:
        runner.cuda_graphs = capture_decode_graphs(
            model, backend, input_batch, kv_caches, graph_sizes, graph_bytes
        )
    window = _common_sliding_window(model)
    if stage is not None and group is not None:  # the scheduler's window: every stage's
        window = _window_of_all_stages(group, window)
    if draft is None or draft_model is None or draft_backend is None:
        runner.proposer = _ngram_proposer(config)
    else:
        # Blocks outside a window are released only if the draft never reads them either.
        window = _wider_window(window, _common_sliding_window(draft_model))
        runner.proposer = _draft_proposer(
            config, draft, draft_model, draft_backend, device, kv_dtype, num_blocks,
            max_model_len, window,
        )  # fmt: skip
    if config.speculative is not None:
        runner.max_spec_batch_size = config.speculative.disable_by_batch_size
    arch = (getattr(ckpt.config, "architectures", None) or ["?"])[0]
    method = quant.method if quant is not None else None
    logger.info(
        "Loaded %s (%s, %s) from %s on %s: %.1f MiB of weights (quantization: %s), "
        "attention backend %s%s",
        arch, ckpt.format, _name(dtype), config.model, device,
        weight_bytes / 2**20, method or "none", backend.name,
        _rank_description(group, stage),
    )  # fmt: skip
    if group is not None and group.is_driver:
        logger.info(
            "Weights per rank (MiB): %s",
            ", ".join(f"rank {r}: {b / 2**20:.1f}" for r, b in enumerate(rank_weight_bytes)),
        )
    logger.info(
        "KV cache (%s): %d blocks x %d tokens = %d tokens (%.2f GiB); max_model_len %d; "
        "maximum concurrency at full length: %.1fx",
        _name(kv_dtype), num_blocks, config.block_size, capacity,
        num_blocks * per_block / GiB, max_model_len, capacity / max_model_len,
    )  # fmt: skip
    if window is not None:
        per_request = -(-(window + config.resolved_max_num_batched_tokens) // config.block_size)
        logger.info(
            "Sliding window of %d tokens on every layer: KV blocks outside it are released, "
            "so a request holds at most ~%d blocks (%d at max_model_len without release)",
            window, per_request + 1, -(-max_model_len // config.block_size),
        )  # fmt: skip
    return EngineParts(
        ckpt, device, dtype, runner, num_blocks, max_model_len, weight_bytes, method, kv_dtype,
        sliding_window=window, rank_weight_bytes=rank_weight_bytes,
    )  # fmt: skip


def _rank_description(group: ParallelGroup | None, stage: Stage | None) -> str:
    """The rank's place in the group for the load log line, naming only the splits in use."""
    if group is None:
        return ""
    parts = []
    if group.tp_size > 1:
        parts.append(f"tensor-parallel rank {group.tp_rank} of {group.tp_size}")
    if stage is not None:
        parts.append(
            f"pipeline stage {stage.pp_rank} of {stage.pp_size} "
            f"(layers {stage.start}..{stage.end - 1})"
        )
    return "; " + ", ".join(parts) if parts else ""


def _window_of_all_stages(group: ParallelGroup, window: int | None) -> int | None:
    """The sliding window the scheduler may release blocks outside: only if every
    stage's layers have one (a stage with a global layer reads every block)."""
    if group.max_int(1 if window is None else 0):
        return None
    return group.max_int(window or 0)


def _open_draft(config: EngineConfig, target: Checkpoint) -> Checkpoint | None:
    """The draft model's checkpoint (None without one), checked against the target's
    vocabulary: the target verifies the draft's token ids as its own."""
    spec = config.speculative
    if spec is None or spec.method != "draft_model" or spec.model is None:
        return None
    draft = open_checkpoint(spec.model)
    sizes = int(draft.config.vocab_size), int(target.config.vocab_size)
    if sizes[0] != sizes[1]:
        raise ValueError(
            f"speculative_config: the draft model {spec.model!r} has a vocabulary of "
            f"{sizes[0]} tokens and the target {config.model!r} one of {sizes[1]}; a draft "
            "must share the target's vocabulary (and tokenizer)."
        )
    draft_vocab, target_vocab = draft.tokenizer.get_vocab(), target.tokenizer.get_vocab()
    if draft_vocab != target_vocab:
        differ = sorted(set(draft_vocab.items()) ^ set(target_vocab.items()))
        raise ValueError(
            f"speculative_config: the draft model {spec.model!r} has another tokenizer than "
            f"the target {config.model!r} ({len(draft_vocab)} vs {len(target_vocab)} tokens, "
            f"{len(differ)} entries differ, e.g. {differ[0]!r}); a draft must share the "
            "target's tokenizer."
        )
    return draft


def _build_draft(
    config: EngineConfig,
    draft: Checkpoint,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
) -> torch.nn.Module:
    """The draft model in the target's dtype and quantization method (no LoRA)."""
    quant = resolve_quantization(
        config.quantization, draft.config, draft.format, config.quantize_lm_head
    )
    draft_max = int(getattr(draft.config, "max_position_embeddings", 0) or 2048)
    return build_model(draft, dtype, device, max(max_positions, draft_max), quant)


def _draft_proposer(
    config: EngineConfig,
    draft: Checkpoint,
    model: torch.nn.Module,
    backend: AttentionBackend,
    device: torch.device,
    kv_dtype: torch.dtype,
    num_blocks: int,
    max_model_len: int,
    sliding_window: int | None,
) -> DraftModelProposer:
    """The draft's KV cache of `num_blocks` blocks (the target's block ids index it) and
    its own attention backend (its KV head count may differ from the target's)."""
    spec = config.speculative
    assert spec is not None  # _open_draft returned a checkpoint
    kv_caches = allocate_kv_caches(
        draft.config, num_blocks, config.block_size, kv_dtype, device, backend
    )
    weight_bytes = resident_weight_bytes(model)
    logger.info(
        "Speculative decoding: draft model %s (%d layers, %.1f MiB of weights), "
        "%d tokens proposed per step",
        spec.model, kv_geometry(draft.config)[0], weight_bytes / 2**20,
        spec.num_speculative_tokens,
    )  # fmt: skip
    return DraftModelProposer(
        model, kv_caches, backend, config.block_size, spec.num_speculative_tokens,
        max_model_len, num_blocks, config.resolved_max_num_batched_tokens, sliding_window,
    )  # fmt: skip


def _wider_window(a: int | None, b: int | None) -> int | None:
    """The window both models' layers stay inside (None: one reads every position)."""
    return None if a is None or b is None else max(a, b)


def _ngram_proposer(config: EngineConfig) -> Proposer | None:
    spec = config.speculative
    if spec is None:
        return None
    assert spec.prompt_lookup_min is not None and spec.prompt_lookup_max is not None  # resolved
    logger.info(
        "Speculative decoding: ngram prompt lookup (n %d..%d), %d tokens proposed per step",
        spec.prompt_lookup_min, spec.prompt_lookup_max, spec.num_speculative_tokens,
    )  # fmt: skip
    return NgramProposer(
        spec.prompt_lookup_min, spec.prompt_lookup_max, spec.num_speculative_tokens
    )


def _common_sliding_window(model: torch.nn.Module) -> int | None:
    """The widest window when every attention layer has one; None when any layer is global
    (then every block stays readable)."""
    windows = [m.sliding_window for m in model.modules() if isinstance(m, Attention)]
    if not windows or any(w is None for w in windows):
        return None
    return max(w for w in windows if w is not None)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cuda_graph_plan(
    config: EngineConfig,
    ckpt: Checkpoint,
    device: torch.device,
    backend: AttentionBackend,
    group: ParallelGroup | None,
) -> tuple[list[int], int]:
    """(bucket sizes, bytes set aside for the graphs); ([], 0) when decode runs eagerly."""
    if device.type != "cuda" or config.enforce_eager:
        return [], 0
    if not backend.supports_cuda_graphs or group is not None:
        why = "tensor-parallel ranks" if group is not None else f"the {backend.name} backend"
        logger.info("No CUDA graphs for decode steps: not with %s yet", why)
        return [], 0
    sizes = capture_sizes(config.max_num_seqs)
    hidden = int(ckpt.config.hidden_size)
    inter = int(getattr(ckpt.config, "intermediate_size", 0) or 4 * hidden)
    return sizes, graph_memory_estimate(sizes, hidden, inter)


def _num_kv_blocks(
    config: EngineConfig, per_block: int, device: torch.device, graph_bytes: int
) -> int:
    """Blocks of `per_block` bytes (every layer's K and V, the draft's too) the budget
    holds (an FP8 cache gets twice the blocks), after `graph_bytes` for CUDA graphs on a
    GPU. Under tensor parallelism the budget is per rank, and so are the block bytes (its
    KV heads)."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if device.type == "cuda":
        budget = _cuda_kv_budget(config, device) - graph_bytes
    else:
        budget = config.kv_cache_memory or DEFAULT_CPU_KV_CACHE_BYTES
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise ValueError(
            f"the KV cache budget ({budget} bytes) holds no block of {per_block} bytes."
        )
    return int(num_blocks)


def _cuda_kv_budget(config: EngineConfig, device: torch.device) -> int:
    """What gpu_memory_utilization leaves after weights and a reserve for activations."""
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    # Activations of one max-size step: a generous rule of thumb, not a profile.
    reserve = 1 * GiB
    budget = int(total * config.gpu_memory_utilization) - used_by_others
    budget -= torch.cuda.memory_reserved(device) + reserve
    return max(budget, 0)
