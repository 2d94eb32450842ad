"""Decode CUDA graphs on CPU: bucket choice, padding that never reaches a real KV slot or the
sampler, and replay against the persistent buffers (an eager stand-in for torch.cuda's
capture that, like a graph, re-runs the captured step's tensors at their fixed addresses)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.core.outputs import ScheduledRequest
from pinnace.runtime.layers.attention import AttentionBackend, AttentionSpec, LayerParams
from pinnace.runtime.layers.attention.flashinfer_backend import FlashInferBackend
from pinnace.runtime.layers.attention.torch_backend import TorchAttentionBackend
from pinnace.runtime.worker.cuda_graphs import CUDAGraphRunner, capture_sizes
from pinnace.runtime.worker.input_batch import InputBatch

CPU = torch.device("cpu")


class EagerGraph:
    """Replays by calling the captured function again (its inputs: the capture's views of
    the persistent buffers) and copying into the captured output, as a graph would."""

    def __init__(self, fn: Callable[[], torch.Tensor], out: torch.Tensor) -> None:
        self.fn, self.out, self.replays = fn, out, 0

    def replay(self) -> None:
        self.out.copy_(self.fn())
        self.replays += 1


def eager_capture(fn: Callable[[], torch.Tensor]) -> tuple[EagerGraph, torch.Tensor]:
    out = fn()
    return EagerGraph(fn, out), out


def test_capture_sizes_and_bucket_choice() -> None:
    assert capture_sizes(256)[:6] == [1, 2, 4, 8, 16, 24] and capture_sizes(256)[-1] == 256
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(100)[-2:] == [96, 100]
    assert capture_sizes(4096)[-1] == 512
    runner = CUDAGraphRunner.__new__(CUDAGraphRunner)
    runner.sizes = capture_sizes(40)
    assert runner.bucket_for([1] * 3, eager_only=False) == 4
    assert runner.bucket_for([1] * 9, eager_only=False) == 16
    assert runner.bucket_for([1] * 40, eager_only=False) == 40
    assert runner.bucket_for([1] * 41, eager_only=False) is None  # above the largest
    assert runner.bucket_for([1, 2], eager_only=False) is None  # a prefill chunk / proposals
    assert runner.bucket_for([1] * 3, eager_only=True) is None  # LoRA, LongRoPE offsets


def test_the_torch_backend_refuses_graphs() -> None:
    batch = InputBatch(4, 8, 2, 4, CPU, pad_slot=8)
    with pytest.raises(ValueError, match="cannot run in CUDA graphs"):
        CUDAGraphRunner(
            torch.nn.Identity(), TorchAttentionBackend(2), batch, [], [1], eager_capture
        )


def test_padded_rows_write_only_the_pad_block(flashinfer_reference: ModuleType) -> None:
    """A decode step of 2 requests padded to 8: the K/V writes land in the 2 real slots and
    the pad block, nowhere else."""
    bs, num_blocks, params = 4, 6, LayerParams(0.25)
    spec = AttentionSpec(4, 2, 16, torch.float32, torch.float32, (params,))
    backend = FlashInferBackend(spec, CPU, flashinfer_reference)
    backend.builder.configure_graphs(8, num_blocks + 9)
    cache = torch.zeros(backend.kv_cache_shape(num_blocks + 1, bs, 2, 16))
    batch = InputBatch(8, 16, 4, bs, CPU, pad_slot=num_blocks * bs)
    reqs = [
        ScheduledRequest(r, [1], c, ids, SamplingParams(), needs_sample=True)
        for r, c, ids in (("a", 5, [3, 1]), ("b", 2, [4]))
    ]
    step = batch.prepare(reqs, num_padded=8)
    meta = backend.builder.build(step.layout, graph_bucket=8)
    k = torch.randn(8, 2, 16)
    backend.forward(torch.randn(8, 4, 16), k, k + 1, cache, meta, 0.25, None)
    written = cache.abs().sum(dim=(3, 4)) > 0  # [block, K|V, offset]
    expected = torch.zeros_like(written)
    expected[1, :, 1] = expected[4, :, 2] = True  # slot 5 of a (block 1), slot 2 of b
    expected[num_blocks, :, 0] = True  # the pad slot
    assert torch.equal(written, expected)
    assert step.sample_idx == [0, 1]


def test_engine_replays_padded_graphs_with_eager_tokens(
    make_tiny_model: Callable[[str], Path],
    flashinfer_reference: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Decode steps of 5 requests replay the bucket-8 capture (3 padded rows): same greedy
    tokens as the eager torch backend. (The stand-in caught rotary tables cached across
    forwards: a replay reused the capture's rows.)"""
    num_prompts = 5
    from pinnace.runtime.engine import setup

    path = str(make_tiny_model("Qwen2ForCausalLM"))
    prompts = [[5 + i, 6, 7 + 2 * i] for i in range(num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine: dict[str, Any] = dict(dtype="float32", kv_cache_memory=2**22, max_num_seqs=8)
    want = [o.outputs[0].token_ids for o in LLM(path, **engine).generate(prompts, params)]

    def flashinfer(name: str, device: torch.device, spec: AttentionSpec) -> AttentionBackend:
        return FlashInferBackend(spec, device, flashinfer_reference)

    runners: list[CUDAGraphRunner] = []

    def capture(*args: Any) -> CUDAGraphRunner:
        model, backend, batch, caches, sizes, _ = args
        runner = CUDAGraphRunner(model, backend, batch, caches, sizes, eager_capture)
        runner.capture_all()
        runners.append(runner)
        return runner

    monkeypatch.setattr(setup, "get_attention_backend", flashinfer)
    monkeypatch.setattr(setup, "_cuda_graph_plan", lambda *a: (capture_sizes(8), 0))
    monkeypatch.setattr(setup, "capture_decode_graphs", capture)
    llm = LLM(path, **engine)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want
    replays = {size: g.replays for size, (g, _) in runners[0]._graphs.items()}  # type: ignore[attr-defined]
    assert replays[8] == 7  # 8 tokens: one from the prefill, 7 decode steps
    assert sum(replays.values()) == 7
