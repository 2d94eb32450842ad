#!/usr/bin/env python3
"""Bytes the driver broadcasts per step and its step time under tensor parallelism: step
deltas (executor/step_messages.py) against the whole SchedulerOutput (the earlier
broadcast), at one batch and context.

    hack/bench/tp_step_messages.py [--batch 32] [--context 400] [--rounds 6] [--threads 1]

TP=2 on CPU (gloo): rank 0 in this process, rank 1 a spawned worker, each with --threads
torch threads. A random Llama (hidden 256, 4 layers, SmolLM2's 49k vocabulary, float32);
`batch` prompts of context - max_tokens / 2 tokens decode max_tokens tokens greedily, so
the decode steps' context averages about `context`. Per round one engine per mode, in
alternating order (ABBA), on the same group: "full" broadcasts the SchedulerOutput as the
executor did before (its worker runs it as is), "delta" is GroupExecutor. Only the steps
where every request decodes one token count: their pickled bytes (the broadcast's), the
driver's step time (GroupExecutor.execute: broadcast, the rank's forward and sampling,
which waits for the worker's unpickling at the first collective) and its send time (the
step time less the runner's: encode, pickle, broadcast). Prints one JSON object: per mode
bytes per step and the median step and send times (ms) per round, summarized as
median/min/max, and the per-round delta/full step-time ratio; and codec_cpu_us, the CPU a
step's message costs its two ends in one process (see _codec_us), less disturbed by a
shared machine than step times.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pickle
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import default_model, summary

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.config import EngineConfig
from pinnace.runtime.core.outputs import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from pinnace.runtime.distributed import parallel_state
from pinnace.runtime.distributed.parallel_state import (
    ParallelGroup,
    destroy_group,
    free_port,
    init_group,
)
from pinnace.runtime.engine import engine_core
from pinnace.runtime.executor import multiproc
from pinnace.runtime.executor.step_messages import StepDecoder, StepEncoder
from pinnace.runtime.worker.model_runner import ModelRunner


class FullGroupExecutor(multiproc.GroupExecutor):
    """The earlier executor: every step's whole SchedulerOutput."""

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.group.broadcast_object(sched)
        return self.parts.runner.execute(sched)


def _serve_either(group: ParallelGroup, runner: ModelRunner) -> None:
    decoder = StepDecoder()
    while (msg := group.broadcast_object()) is not None:
        runner.execute(msg if isinstance(msg, SchedulerOutput) else decoder.decode(msg))


def _worker(*args: Any) -> None:
    multiproc._serve = _serve_either  # type: ignore[assignment]
    multiproc.run_worker(*args)


class _CountingPickle:
    """parallel_state's pickle, recording the size of what the driver broadcasts."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def dumps(self, obj: object, *args: Any, **kwargs: Any) -> bytes:
        data = pickle.dumps(obj, *args, **kwargs)
        self.sizes.append(len(data))
        return data

    loads = staticmethod(pickle.loads)


def _model(out: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = default_model()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _run(
    mode: str, model: Path, rank0: ParallelGroup, proc: Any, args: argparse.Namespace
) -> dict[str, float]:
    cls = FullGroupExecutor if mode == "full" else multiproc.GroupExecutor
    patch = engine_core.make_executor
    engine_core.make_executor = lambda c: cls(c, rank0, [proc])  # type: ignore[assignment]
    try:
        llm = LLM(str(model), tensor_parallel_size=2, dtype="float32", max_num_seqs=args.batch,
                  max_model_len=args.context + args.max_tokens,
                  max_num_batched_tokens=4096, num_kv_blocks=args.batch * (args.context // 16 + 8),
                  enable_prefix_caching=False)  # fmt: skip
    finally:
        engine_core.make_executor = patch  # type: ignore[assignment]
    executor = llm.llm_engine.core.executor
    counter = _CountingPickle()
    real, runner = executor.execute, executor.parts.runner
    real_run = runner.execute
    times: list[float] = []
    sends: list[float] = []
    sizes: list[int] = []
    run_s = [0.0]

    def timed_run(sched: SchedulerOutput) -> ModelRunnerOutput:
        t0 = time.perf_counter()
        out = real_run(sched)
        run_s[0] = time.perf_counter() - t0
        return out

    def timed(sched: SchedulerOutput) -> ModelRunnerOutput:
        counter.sizes.clear()
        t0 = time.perf_counter()
        out = real(sched)
        dt = time.perf_counter() - t0
        if sched.total_num_scheduled_tokens == len(sched.scheduled) == args.batch:
            times.append(dt)
            sends.append(dt - run_s[0])
            sizes.append(counter.sizes[0])
        return out

    executor.execute = timed  # type: ignore[method-assign]
    runner.execute = timed_run  # type: ignore[method-assign]
    parallel_state.pickle = counter  # type: ignore[assignment]
    prompt_len = args.context - args.max_tokens // 2
    prompts = [
        [100 + (i * 131 + j * 7) % 40000 for j in range(prompt_len)] for i in range(args.batch)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    try:
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        parallel_state.pickle = pickle  # type: ignore[assignment]
        llm.shutdown()
    return {
        "step_ms": statistics.median(times) * 1e3,
        "send_ms": statistics.median(sends) * 1e3,
        "bytes": statistics.median(sizes),
        "steps": len(times),
    }


def _codec_us(args: argparse.Namespace, rounds: int) -> dict[str, list[float]]:
    """The CPU the message costs per decode step, in this process (steadier than step
    times on a shared machine): full = pickle + unpickle of the SchedulerOutput, delta =
    encode + pickle + unpickle + decode (the requests already known). `batch` requests of
    `context` tokens (prompt context - 16, 16 outputs), block size 16, default sampling."""
    prompt = list(range(1000, 1000 + args.context - 16))
    sched = SchedulerOutput(
        [
            ScheduledRequest(
                req_id=f"cmpl-{i:032x}-0",
                token_ids=[7],
                num_computed_tokens=args.context - 1,
                block_ids=list(range(i * 64, i * 64 + args.context // 16 + 1)),
                sampling_params=SamplingParams(temperature=0.0, max_tokens=64),
                needs_sample=True,
                num_output_tokens=16,
                prompt_token_ids=list(prompt),
                output_token_ids=list(range(16)),
            )
            for i in range(args.batch)
        ]
    )
    encoder, decoder = StepEncoder(), StepDecoder()
    decoder.decode(encoder.encode(sched))

    def full() -> None:
        pickle.loads(pickle.dumps(sched))

    def delta() -> None:
        decoder.decode(pickle.loads(pickle.dumps(encoder.encode(sched))))

    out: dict[str, list[float]] = {"full": [], "delta": []}
    for r in range(rounds):
        for name, fn in (("full", full), ("delta", delta))[:: 1 if r % 2 == 0 else -1]:
            n, t0 = 200, time.perf_counter()
            for _ in range(n):
                fn()
            out[name].append((time.perf_counter() - t0) / n * 1e6)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=400)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = EngineConfig(model="unused", tensor_parallel_size=2, num_threads=2 * args.threads)
    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_worker, args=(config, 1, "127.0.0.1", port, os.getpid(), sender), daemon=True
    )
    proc.start()
    sender.close()
    runs: dict[str, list[dict[str, float]]] = {"full": [], "delta": []}
    codec = _codec_us(args, 2 * args.rounds)
    try:
        multiproc.wait_joining([receiver], [proc])
        rank0 = init_group(0, 2, 2, "127.0.0.1", port, torch.device("cpu"))
        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            model = _model(Path(tmp))
            for r in range(args.rounds):
                order = ("full", "delta") if r % 2 == 0 else ("delta", "full")
                for mode in order:
                    runs[mode].append(_run(mode, model, rank0, proc, args))
        rank0.broadcast_object(None)
        proc.join(timeout=30)
    finally:
        if proc.is_alive():
            proc.kill()
        destroy_group()
    result: dict[str, Any] = {
        "batch": args.batch, "context": args.context, "threads_per_rank": args.threads,
        "rounds": args.rounds, "decode_steps_per_run": runs["delta"][0]["steps"],
    }  # fmt: skip
    for mode, rs in runs.items():
        result[mode] = {
            "bytes_per_step": summary([r["bytes"] for r in rs], 0),
            "step_ms": summary([r["step_ms"] for r in rs], 2),
            "send_ms": summary([r["send_ms"] for r in rs], 3),
            "codec_cpu_us": summary(codec[mode], 1),
        }
    ratios = [d["step_ms"] / f["step_ms"] for d, f in zip(runs["delta"], runs["full"], strict=True)]
    result["delta_over_full_step_ms_by_round"] = summary(ratios, 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
