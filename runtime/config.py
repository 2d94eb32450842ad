"""Engine configuration: one dataclass, validated once for the Python API, CLI and HTTP."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pinnace.runtime.layers.quantization.config import KV_CACHE_DTYPES, METHODS
from pinnace.runtime.spec_decode.config import SpeculativeConfig

DEFAULT_CPU_KV_CACHE_BYTES = 4 * 1024**3
# vLLM's --runner and --convert: what the engine serves. "auto" decides from the checkpoint
# (models/registry.resolve_runner); convert "embed" pools a causal LM's hidden states.
RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "embed")
# --attention-backend: auto picks FlashInfer on CUDA when it imports (layers/attention/selector.py)
ATTENTION_BACKENDS = ("auto", "torch", "flashinfer")
# torch.distributed's customary rendezvous port, used when a multi-node group names none.
DEFAULT_MASTER_PORT = 29500


SPEC_NEEDS_GENERATE = (
    "speculative decoding (speculative_config, --speculative-config) needs runner "
    "'generate'; this model runs with runner 'pooling' (embeddings)."
)


NUM_THREADS_ENV = "PINNACE_NUM_THREADS"


@dataclass
class EngineConfig:
    """Engine options, named as vLLM names them."""

    model: str
    tokenizer: str | None = None  # reserved: the model folder's tokenizer is used
    served_model_name: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: 2048 (chunked prefill beyond it)
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory: int | None = None  # bytes of KV cache on CPU (default 4 GiB)
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # explicit block count; overrides the memory budget
    seed: int | None = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    attention_backend: str = "auto"  # auto | torch | flashinfer (ATTENTION_BACKENDS)
    enforce_eager: bool = False  # no CUDA graphs for decode steps (vLLM's flag)
    chat_template: str | None = None  # a file path or the template text
    max_logprobs: int = 20
    # int8 | fp8 (weights quantized at load) | gptq | awq (from config.json, detected when
    # None) | gguf (a GGUF file's 4-bit blocks kept 4-bit, other quantized types int8)
    quantization: str | None = None
    # int8 / fp8: also the LM head and the token embedding (one copy when tied); False keeps
    # both in the model dtype (vLLM's default for its schemes): on SmolLM2-135M 1.2x int8's
    # batch-1 bytes, perplexity +0.11 % of bf16 instead of +0.96 % (README, Quantization).
    quantize_lm_head: bool = True
    kv_cache_dtype: str = "auto"  # auto (the model dtype) | fp8 (scaled e4m3, half the bytes)
    enable_lora: bool = False
    max_loras: int = 1  # adapters one step may use (device slots)
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # adapters kept in host memory; None: max_loras
    # vLLM's shape: {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
    # or {"model": PATH, "num_speculative_tokens": 3}; a SpeculativeConfig after checks.
    speculative_config: dict[str, Any] | SpeculativeConfig | None = None
    runner: str = "auto"  # generate (completions, chat) | pooling (embeddings) | auto
    convert: str = "auto"  # embed: serve a causal LM as an embedding model (runner pooling)
    # Parallelism (vLLM's names). world_size = tensor x pipeline ranks, spread evenly over
    # nnodes nodes; node 0 (master_addr) runs the scheduler, the API server and rank 0.
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None  # None: 127.0.0.1 on one node; required for nnodes > 1
    master_port: int | None = None  # None: a free port on one node, 29500 for nnodes > 1
    # CPU threads of the engine's one OpenMP pool (torch's, which the native kernels share),
    # split evenly over the ranks of a node; None: $PINNACE_NUM_THREADS, else torch's default.
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.num_threads is None and os.environ.get(NUM_THREADS_ENV):
            value = os.environ[NUM_THREADS_ENV]
            if not value.isdigit():
                raise ValueError(f"{NUM_THREADS_ENV} must be a positive integer, got {value!r}.")
            self.num_threads = int(value)
        if self.num_threads is not None:
            _positive("num_threads", self.num_threads)
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("block_size", self.block_size)
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        if self.max_num_batched_tokens is not None:
            _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.num_kv_blocks is not None:
            _positive("num_kv_blocks", self.num_kv_blocks)
        if self.kv_cache_memory is not None:
            _positive("kv_cache_memory", self.kv_cache_memory)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}."
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "float", "half"):
            raise ValueError(
                f"dtype {self.dtype!r} is not one of auto, float32, bfloat16, float16."
            )
        if self.quantization is not None and self.quantization not in METHODS:
            raise ValueError(
                f"quantization {self.quantization!r} is not one of {', '.join(METHODS)}."
            )
        if not self.quantize_lm_head and self.quantization not in ("int8", "fp8"):
            raise ValueError(
                "quantize_lm_head=False applies to quantization='int8' or 'fp8' (quantized "
                f"at load), not to quantization={self.quantization!r}."
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype {self.kv_cache_dtype!r} is not one of "
                f"{', '.join(KV_CACHE_DTYPES)}."
            )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend {self.attention_backend!r} is not one of "
                f"{', '.join(ATTENTION_BACKENDS)}."
            )
        self._check_lora()
        if self.speculative_config is not None:
            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        self._check_runner()
        self._check_parallel()
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be non-negative, got {self.max_logprobs}.")
        if self.chat_template is not None and os.path.isfile(self.chat_template):
            with open(self.chat_template) as f:
                self.chat_template = f.read()

    def _check_lora(self) -> None:
        _positive("max_loras", self.max_loras)
        _positive("max_lora_rank", self.max_lora_rank)
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        _positive("max_cpu_loras", self.max_cpu_loras)
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras "
                f"({self.max_loras})."
            )

    def _check_runner(self) -> None:
        if self.runner not in RUNNERS:
            raise ValueError(f"runner {self.runner!r} is not one of {', '.join(RUNNERS)}.")
        if self.convert not in CONVERTS:
            raise ValueError(f"convert {self.convert!r} is not one of {', '.join(CONVERTS)}.")
        if self.convert == "embed" and self.runner == "generate":
            raise ValueError("convert 'embed' makes an embedding model: it needs runner pooling.")
        is_pooling = self.runner == "pooling" or self.convert == "embed"
        if self.speculative_config is not None and is_pooling:
            raise ValueError(SPEC_NEEDS_GENERATE)

    def _check_parallel(self) -> None:
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        _positive("pipeline_parallel_size", self.pipeline_parallel_size)
        _positive("nnodes", self.nnodes)
        if not isinstance(self.node_rank, int) or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(
                f"node_rank must be in 0..{self.nnodes - 1} (nnodes={self.nnodes}), "
                f"got {self.node_rank!r}."
            )
        if self.world_size % self.nnodes:
            raise ValueError(
                f"tensor_parallel_size x pipeline_parallel_size = {self.world_size} ranks do "
                f"not split evenly over nnodes={self.nnodes} (every node runs as many ranks)."
            )
        if self.nnodes > 1 and not self.master_addr:
            raise ValueError(
                f"nnodes={self.nnodes} needs master_addr, the address of node 0 "
                "(--master-addr, or LWS_LEADER_ADDRESS in a LeaderWorkerSet pod)."
            )
        if self.master_port is None and self.nnodes > 1:
            self.master_port = DEFAULT_MASTER_PORT
        if self.master_port is not None and not 1 <= self.master_port <= 65535:
            raise ValueError(f"master_port must be in 1..65535, got {self.master_port}.")

    @property
    def world_size(self) -> int:
        """Ranks in the whole group: tensor_parallel_size x pipeline_parallel_size."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def local_world_size(self) -> int:
        """Ranks this node runs (one device each)."""
        return self.world_size // self.nnodes

    @property
    def speculative(self) -> SpeculativeConfig | None:
        """The checked speculative_config (None: no speculative decoding)."""
        spec = self.speculative_config
        return spec if isinstance(spec, SpeculativeConfig) else None

    @property
    def resolved_max_num_batched_tokens(self) -> int:
        return self.max_num_batched_tokens or 2048


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
