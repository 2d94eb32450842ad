#!/usr/bin/env python3
"""Where a decode step's time goes: matmul, LM head, attention, norm, other model ops, and
the engine around the model (scheduling, sampling, detokenization, Python).

    hack/bench/step_profile.py --batch-sizes 1,32 --dtype bfloat16 --threads 2 --rounds 3

--compare-onednn adds a variant with the native bf16 GEMV off (oneDNN for every row count),
alternating with the default in each round: the GEMV's before/after in one run.
--compare-module-path adds a variant with the one-call native Llama decode off
(models/llama_native.py: every decode layer through the PyTorch modules), likewise.

Each leaf module's forward is wrapped with a timer (CPU execution is synchronous, so wall
time is the op's time); only decode forwards (one token per request) are counted. "other
model" is the model forward minus its timed leaves (embedding, rotary, residual adds,
activation, reshapes); "engine" is the generate wall time minus every forward, per step.
Prints one JSON object: per variant and batch size, the median over rounds of ms per decode
step and of each part's ms, and each part's share of the median step.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pinnace.runtime.kernels.llama_decode import PARTS

# The native decode's parts (kernels/llama_decode.c) -> this profile's categories.
NATIVE_CATEGORY = {"norm": "norm", "matmul": "matmul", "attention": "attention"}


def category(name: str, module: nn.Module) -> str | None:
    kind = type(module).__name__
    if name.endswith("lm_head"):
        return "lm_head"
    if "Linear" in kind:
        return "matmul"
    if kind == "Attention":
        return "attention"
    if "RMSNorm" in kind:
        return "norm"
    return None


class StepTimer:
    """Accumulates each category's time over decode forwards of `batch` tokens."""

    def __init__(self, model: nn.Module, batch: int) -> None:
        self.batch = batch
        self.times: collections.Counter[str] = collections.Counter()
        self.decode_steps = 0
        self.forward_s = 0.0  # every forward, prefill included
        self._in_decode = False
        self.native = getattr(getattr(model, "model", None), "native_decode", None)
        if self.native is not None:
            self.native.timings = (ctypes.c_double * len(PARTS))()
        for name, module in model.named_modules():
            cat = category(name, module)
            if cat is not None:
                module.forward = self._timed(module.forward, cat)  # type: ignore[method-assign]
            if cat == "attention" and hasattr(module, "rope_forward"):
                # The fused rotary + K/V write + attention call (CPU bf16 decode steps).
                module.rope_forward = self._timed(module.rope_forward, cat)
        model.forward = self._model_forward(model.forward)  # type: ignore[method-assign]

    def _timed(self, fn: Callable[..., Any], cat: str) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if self._in_decode:
                self.times[cat] += time.perf_counter() - start
            return out

        return run

    def _model_forward(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(input_ids: torch.Tensor, positions: torch.Tensor) -> Any:
            self._in_decode = input_ids.shape[0] == self.batch
            before = list(self.native.timings) if self.native is not None else []
            start = time.perf_counter()
            out = fn(input_ids, positions)
            elapsed = time.perf_counter() - start
            self.forward_s += elapsed
            if self._in_decode:
                self.times["model"] += elapsed
                self.decode_steps += 1
                if self.native is not None:
                    for part, old, new in zip(PARTS, before, self.native.timings, strict=True):
                        if part in NATIVE_CATEGORY:
                            self.times[NATIVE_CATEGORY[part]] += new - old
            return out

        return run


def profile(
    model_path: str, batch: int, args: argparse.Namespace, gemv: bool, native: bool
) -> dict[str, Any]:
    from throughput import make_prompts

    from pinnace.runtime import LLM, SamplingParams
    from pinnace.runtime.kernels.bf16_gemv import bf16_gemv
    from pinnace.runtime.layers import linear
    from pinnace.runtime.models import llama_native

    linear.bf16_gemv = bf16_gemv if gemv else lambda: None  # type: ignore[assignment]
    llama_native.NativeLlamaDecode.enabled = native

    llm = LLM(
        model_path,
        dtype=args.dtype,
        max_num_seqs=batch,
        kv_cache_memory=1024**3,
        max_model_len=args.input_len + args.output_len + 16,
        quantization=args.quantization,
    )
    prompts = make_prompts(batch, args.input_len)
    llm.generate(prompts, SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    timer = StepTimer(llm.llm_engine.core.runner.model, batch)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    steps = args.output_len  # one prefill step (it samples the first token) + decode steps
    t = timer.times
    parts = {
        "matmul": t["matmul"],
        "lm_head": t["lm_head"],  # outside the model forward (compute_logits)
        "attention": t["attention"],
        "norm": t["norm"],
        "other_model": t["model"] - t["matmul"] - t["attention"] - t["norm"],
    }
    decode_steps = max(timer.decode_steps, 1)
    step_ms = 1000 * t["model"] / decode_steps
    engine_ms = 1000 * (wall - timer.forward_s) / steps - 1000 * t["lm_head"] / decode_steps
    total = step_ms + 1000 * t["lm_head"] / decode_steps + engine_ms
    result = {k: round(1000 * v / max(timer.decode_steps, 1), 3) for k, v in parts.items()}
    result["engine"] = round(engine_ms, 3)
    result["step"] = round(total, 3)
    return result


def summarize(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Median over rounds of each part (ms) and each part's share of the median step."""
    import statistics

    ms = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
    steps = [r["step"] for r in runs]
    return {
        "ms_per_step": {"median": ms["step"], "min": min(steps), "max": max(steps)},
        "ms": {k: v for k, v in ms.items() if k != "step"},
        "share": {k: round(v / ms["step"], 3) for k, v in ms.items() if k != "step"},
    }


def main() -> int:
    from throughput import build_random_model

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="HF folder or .gguf (default: random SmolLM2-shaped)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--input-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare-onednn", action="store_true")
    parser.add_argument("--compare-module-path", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = {"default": (True, True)}  # (native GEMV, one-call native decode)
    if args.compare_onednn:
        variants["onednn_only"] = (False, False)
    if args.compare_module_path:
        variants["module_path"] = (True, False)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    runs: dict[tuple[str, int], list[dict[str, float]]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_random_model(tmp, getattr(torch, args.dtype))
        for _ in range(args.rounds):
            for name, (gemv, native) in variants.items():
                for b in batches:
                    runs[name, b].append(profile(model, b, args, gemv, native))
    result = {
        "bench": "step_profile",
        "dtype": args.dtype,
        "quantization": args.quantization,
        "threads": args.threads,
        "rounds": args.rounds,
        "load_average": os.getloadavg()[0],
        "runs": {f"{name} batch {b}": summarize(runs[name, b]) for name, b in runs},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
