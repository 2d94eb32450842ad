#!/usr/bin/env python3
"""Offline throughput: Pinnace vs transformers' batched `generate`, same model, same run.

    hack/bench/throughput.py --batch-size 32 --num-prompts 32 --dtype bfloat16

Without --model, a random-weight model with SmolLM2-135M's shape is built (weights don't
change the speed). Prints one JSON object: output tokens/s for both and their ratio.
Run it from outside the repository root, or via its path (it does not import ./operator).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

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
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_SHAPE), dtype=dtype)
    model.save_pretrained(out_dir)
    # The benchmark feeds token ids; any tokenizer with the right vocab size will do.
    vocab = {f"t{i}": i for i in range(SMOLLM2_SHAPE["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t0").save_pretrained(out_dir)
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
    )
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[: args.batch_size], SamplingParams(max_tokens=4), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def run_transformers(model_path: str, prompts: list[list[int]], args: argparse.Namespace) -> float:
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_workload_args(parser, "HF folder or .gguf (default: random SmolLM2-shaped)")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_random_model(tmp, getattr(torch, args.dtype))
        prompts = make_prompts(args.num_prompts, args.input_len)
        ours = run_pinnace(model, prompts, args)
        ref = None if args.skip_transformers else run_transformers(model, prompts, args)
    result = {
        "bench": "throughput",
        "model": args.model or "random-smollm2-135m-shape",
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "threads": args.threads,
        "pinnace_tok_s": round(ours, 2),
        "transformers_tok_s": None if ref is None else round(ref, 2),
        "ratio": None if ref is None else round(ours / ref, 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
