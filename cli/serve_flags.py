"""`pinnace serve`'s command line: its flags, in groups, as vLLM spells them.

Turning them into the engine's and the server's settings is serve.py's `build_config`.
"""

from __future__ import annotations

import argparse
import re

from pinnace.runtime.server.tool_parsers import TOOL_PARSERS  # plain Python: cheap to import

API_KEY_ENV = "PINNACE_API_KEY"

_BYTE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}  # fmt: skip


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5G', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"--kv-cache-memory {text!r} is not a size like 2GiB, 512MiB or 1e9.")
    value = float(match.group(1)) * _BYTE_UNITS[(match.group(2) or "").lower()]
    if value < 1:
        raise ValueError(f"--kv-cache-memory must be positive, got {text!r}.")
    return int(value)


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """Every flag of `pinnace serve` but MODEL, in its help groups."""
    _add_http_flags(p.add_argument_group("HTTP"))
    _add_engine_flags(p.add_argument_group("engine"))
    _add_lora_flags(p.add_argument_group("LoRA adapters"))
    _add_parallel_flags(p.add_argument_group("parallelism (tensor, pipeline, multi-node)"))
    _add_compat_flags(p.add_argument_group("accepted as in vLLM; unsupported values fail"))


def _add_http_flags(http: argparse._ArgumentGroup) -> None:
    http.add_argument("--host", default="0.0.0.0", help="address to bind")
    http.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let tool_choice "auto" (the default with tools) read calls from the reply',
    )
    http.add_argument(
        "--tool-call-parser",
        default=None,
        choices=sorted(TOOL_PARSERS),
        help="the reply format of the model's tool calls (with --enable-auto-tool-choice)",
    )
    http.add_argument("--port", type=int, default=8000, help="port to bind")
    http.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="also serve KServe's Open Inference Protocol over gRPC on this port (same "
        "host, engine and API key); off when not given",
    )
    http.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="name(s) clients use for the model; derived from MODEL when not given",
    )
    http.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY'; also read from ${API_KEY_ENV}",
    )
    http.add_argument(
        "--max-waiting-requests",
        type=int,
        default=None,
        help="answer 503 with Retry-After once this many requests wait",
    )
    http.add_argument(
        "--max-request-body-bytes",
        type=parse_bytes,
        default=None,
        help="answer 413 to larger request bodies before reading them (e.g. 32Mi); "
        "default: 64 bytes per token of --max-model-len, at least 16 MiB",
    )
    http.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM: stop being ready, refuse new requests, and give requests in "
        "flight this many seconds to finish (default 30)",
    )
    http.add_argument(
        "--metrics-prefix-vllm",
        action="store_true",
        help="also expose every metric under its vllm: name",
    )
    http.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )


def _add_engine_flags(engine: argparse._ArgumentGroup) -> None:
    engine.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16", "float", "half"],
    )
    engine.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length; the model's (capped by the KV cache) when not given",
    )
    engine.add_argument("--max-num-seqs", type=int, default=256, help="max running requests")
    engine.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens per step, 2048 when not given; longer prefills are chunked",
    )
    engine.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    engine.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse KV blocks of shared prompt prefixes",
    )
    engine.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of GPU memory for weights, activations and KV cache",
    )
    engine.add_argument(
        "--kv-cache-memory",
        default=None,
        metavar="BYTES",
        help="KV cache budget on CPU, e.g. 2GiB or 512MiB; 4GiB when not given",
    )
    engine.add_argument(
        "--num-gpu-blocks-override",
        type=int,
        default=None,
        help="exact number of KV blocks, ignoring the memory budgets",
    )
    engine.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    engine.add_argument(
        "--attention-backend",
        default="auto",
        help="auto | torch | flashinfer; auto: FlashInfer on CUDA when it imports (the gpu "
        "extra), else torch",
    )
    engine.add_argument(
        "--enforce-eager", action="store_true", help="no CUDA graphs for decode steps"
    )
    engine.add_argument(
        "--chat-template",
        default=None,
        help="chat template file or text; the tokenizer's when not given",
    )
    engine.add_argument(
        "--runner",
        default="auto",
        choices=["auto", "generate", "pooling"],
        help="generate: completions, chat and KServe inference; pooling: /v1/embeddings; "
        "auto: pooling for embedding checkpoints (sentence-transformers folders, *Model "
        "architectures), else generate",
    )
    engine.add_argument(
        "--convert",
        default="auto",
        choices=["auto", "embed"],
        help="embed: serve a causal LM as an embedding model (pooled hidden states)",
    )
    engine.add_argument(
        "--task",
        default=None,
        choices=["generate", "embed", "embedding"],
        help="older vLLM spelling: generate is --runner generate, embed --runner pooling",
    )
    engine.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    engine.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of the engine (torch and the native kernels share one OpenMP "
        "pool; split over tensor-parallel ranks); default: $PINNACE_NUM_THREADS, else "
        "torch's default (the cores this process may use)",
    )
    engine.add_argument(
        "--speculative-config",
        default=None,
        metavar="JSON",
        help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_max": 4}\'; off when not given',
    )
    engine.add_argument(
        "--max-logprobs", type=int, default=20, help="max logprobs a request may ask for"
    )


def _add_compat_flags(later: argparse._ArgumentGroup) -> None:
    later.add_argument(
        "--quantization",
        default=None,
        help="int8 | fp8 (quantized at load), gguf (keep a GGUF's 4-bit blocks); gptq, awq "
        "and fp8 checkpoints are detected from config.json",
    )
    later.add_argument(
        "--quantize-lm-head",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="int8 / fp8: also the LM head and the token embedding (--no-quantize-lm-head "
        "keeps them in the model dtype, as vLLM does)",
    )
    later.add_argument(
        "--kv-cache-dtype", default="auto", help="auto | fp8 (scaled e4m3, half the memory)"
    )


def _add_parallel_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--tensor-parallel-size", "-tp", type=int, default=1, help="ranks sharing each layer"
    )
    group.add_argument(
        "--pipeline-parallel-size", "-pp", type=int, default=1, help="stages of layers"
    )
    env = "in a LeaderWorkerSet pod, default "
    group.add_argument(
        "--nnodes",
        type=int,
        default=None,
        help=f"nodes in the group ({env}$LWS_GROUP_SIZE, else 1)",
    )
    group.add_argument(
        "--node-rank",
        type=int,
        default=None,
        help=f"this node's index, 0 runs the API server ({env}$LWS_WORKER_INDEX, else 0)",
    )
    group.add_argument(
        "--master-addr",
        default=None,
        help=f"node 0's address for the rendezvous ({env}$LWS_LEADER_ADDRESS)",
    )
    group.add_argument(
        "--master-port",
        type=int,
        default=None,
        help="rendezvous port on node 0 (a free port on one node, 29500 across nodes)",
    )


def _add_lora_flags(lora: argparse._ArgumentGroup) -> None:
    lora.add_argument(
        "--enable-lora",
        action="store_true",
        help="serve PEFT LoRA adapters (also loaded at run time: POST /v1/load_lora_adapter)",
    )
    lora.add_argument(
        "--lora-modules",
        nargs="+",
        default=None,
        metavar="NAME=PATH",
        help='adapters served from the start, as name=path or \'{"name": ..., "path": ...}\'',
    )
    lora.add_argument(
        "--max-loras", type=int, default=1, help="adapters one batch may mix (device slots)"
    )
    lora.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank")
    lora.add_argument(
        "--max-cpu-loras",
        type=int,
        default=None,
        help="adapters kept in host memory; --max-loras when not given",
    )
