#!/usr/bin/env python3
"""MoE throughput: a random Mixtral-shaped model (8 experts, top-2), Pinnace vs transformers'
batched `generate`, on throughput.py's workload.

    hack/bench/moe.py --batch-size 16 --num-prompts 16 --input-len 64 --output-len 64

Prints one JSON object like throughput.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, MixtralConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import (
    SMOLLM2_SHAPE,
    add_workload_args,
    make_prompts,
    run_pinnace,
    run_transformers,
)

MIXTRAL_SHAPE = dict(
    vocab_size=SMOLLM2_SHAPE["vocab_size"],
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
    architectures=["MixtralForCausalLM"],
)


def build_random_mixtral(out_dir: str, dtype: torch.dtype) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MixtralConfig(**MIXTRAL_SHAPE), dtype=dtype)
    model.save_pretrained(out_dir)
    vocab = {f"t{i}": i for i in range(MIXTRAL_SHAPE["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t0").save_pretrained(out_dir)
    return out_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_workload_args(parser, "unused: the model is a random Mixtral-shaped one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_random_mixtral(tmp, getattr(torch, args.dtype))
        prompts = make_prompts(args.num_prompts, args.input_len)
        ours = run_pinnace(model, prompts, args)
        ref = run_transformers(model, prompts, args)
    shape = {k: v for k, v in MIXTRAL_SHAPE.items() if k != "architectures"}
    print(json.dumps({
        "bench": "moe", "shape": shape, "dtype": args.dtype, "batch_size": args.batch_size,
        "num_prompts": args.num_prompts, "input_len": args.input_len,
        "output_len": args.output_len, "threads": args.threads,
        "pinnace_tok_s": round(ours, 2), "transformers_tok_s": round(ref, 2),
        "ratio": round(ours / ref, 3),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
