"""The FlashInfer backend's glue on CPU, against tests/runtime/flashinfer_reference.py (the
wrapper API in torch): its KV layout, page tables, once-per-step planning and mixed
prefill + decode steps give the torch backend's attention, and whole engines agree."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.core.outputs import ScheduledRequest
from pinnace.runtime.layers.attention import (
    AttentionBackend,
    AttentionSpec,
    LayerParams,
    flashinfer_backend,
    get_attention_backend,
)
from pinnace.runtime.layers.attention.flashinfer_backend import FlashInferBackend
from pinnace.runtime.layers.attention.torch_backend import TorchAttentionBackend
from pinnace.runtime.worker.input_batch import InputBatch

CPU = torch.device("cpu")
H, HKV, D, BS = 8, 2, 16, 4
HISTORY = [5, 9, 0, 3]  # tokens already cached per request before the mixed step
MIXED = [1, 1, 6, 3]  # the mixed step: two decodes first, then a prompt and a chunk


def _requests(block_ids: list[list[int]], computed: list[int], lens: list[int]) -> list:
    return [
        ScheduledRequest(f"r{i}", [0] * n, c, ids, SamplingParams(), needs_sample=True)
        for i, (ids, c, n) in enumerate(zip(block_ids, computed, lens, strict=True))
        if n
    ]


def _run_steps(
    backend: AttentionBackend, dtype: torch.dtype, kv_dtype: torch.dtype, params: LayerParams
) -> tuple[list[torch.Tensor], list[Any]]:
    """Prefill each request's history, then the mixed step, then a decode step, through two
    layers; outputs and metadata per step. Same random q/k/v for every backend."""
    g = torch.Generator().manual_seed(0)
    total = [h + m + 1 for h, m in zip(HISTORY, MIXED, strict=True)]
    per_req = [-(-n // BS) for n in total]
    order = torch.randperm(sum(per_req) + 2, generator=g).tolist()
    block_ids = [order[sum(per_req[:i]) : sum(per_req[: i + 1])] for i in range(len(total))]
    shape = backend.kv_cache_shape(len(order), BS, HKV, D)
    caches = [torch.zeros(shape, dtype=kv_dtype) for _ in range(2)]
    batch = InputBatch(8, 64, 8, BS, CPU)
    mixed_computed = HISTORY
    steps = [
        _requests(block_ids, [0] * 4, HISTORY),
        _requests(block_ids, mixed_computed, MIXED),
        _requests(block_ids, [h + m for h, m in zip(HISTORY, MIXED, strict=True)], [1] * 4),
    ]
    outs, metas = [], []
    for scheduled in steps:
        layout = batch.prepare(scheduled).layout
        meta = backend.build_metadata(layout)
        num_tokens = sum(layout.query_lens)
        for cache in caches:  # two layers, one metadata
            q = torch.randn(num_tokens, H, D, generator=g).to(dtype)
            k = torch.randn(num_tokens, HKV, D, generator=g).to(dtype)
            v = torch.randn(num_tokens, HKV, D, generator=g).to(dtype)
            out = backend.forward(q, k, v, cache, meta, params.scale, *_rest(params))
        outs.append(out.float())
        metas.append(meta)
    return outs, metas


def _rest(p: LayerParams) -> tuple[int | None, float | None]:
    return p.sliding_window, p.softcap


CASES = [
    pytest.param(torch.float32, torch.float32, LayerParams(D**-0.5), 1e-5, id="f32"),
    pytest.param(torch.float32, torch.float32, LayerParams(0.3, 5), 1e-5, id="window"),
    pytest.param(torch.float32, torch.float32, LayerParams(0.3, None, 2.0), 1e-5, id="softcap"),
    pytest.param(torch.bfloat16, torch.float8_e4m3fn, LayerParams(D**-0.5, 7), 2e-2, id="fp8kv"),
]


@pytest.mark.parametrize(("dtype", "kv_dtype", "params", "tol"), CASES)
def test_flashinfer_glue_matches_the_torch_backend(
    flashinfer_reference: ModuleType,
    dtype: torch.dtype,
    kv_dtype: torch.dtype,
    params: LayerParams,
    tol: float,
) -> None:
    spec = AttentionSpec(H, HKV, D, dtype, kv_dtype, (params, params))
    fi = FlashInferBackend(spec, CPU, flashinfer_reference)
    got, metas = _run_steps(fi, dtype, kv_dtype, params)
    want, _ = _run_steps(TorchAttentionBackend(HKV), dtype, kv_dtype, params)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"step {step}")
    prefill, mixed, decode = metas
    assert (prefill.num_decodes, mixed.num_decodes, decode.num_decodes) == (0, 2, 4)
    assert not decode.prefill and set(mixed.decode) == set(mixed.prefill) == {params}
    # One plan per wrapper per step, whatever the number of layers (3 steps here).
    assert fi.builder._decode[params].num_plans == 2
    assert fi.builder._prefill[params].num_plans == 2


def test_graph_bucket_wrappers_keep_their_buffers(flashinfer_reference: ModuleType) -> None:
    """A CUDA-graph decode wrapper is planned into buffers allocated once per bucket."""
    params = LayerParams(D**-0.5)
    spec = AttentionSpec(H, HKV, D, torch.float32, torch.float32, (params,))
    fi = FlashInferBackend(spec, CPU, flashinfer_reference)
    fi.builder.configure_graphs(max_bucket=4, max_pages=16)
    batch = InputBatch(8, 16, 4, BS, CPU, pad_slot=30 * BS)
    reqs = _requests([[1, 2], [3]], [5, 2], [1, 1])
    meta = fi.builder.build(batch.prepare(reqs, num_padded=4).layout, graph_bucket=4)
    wrapper = meta.decode[params]
    buffers = [b.data_ptr() for b in wrapper.buffers]
    assert wrapper.buffers[0].tolist() == [0, 2, 3, 4, 5]  # 2 + 1 pages, one per padded row
    reqs = _requests([[1, 2], [3, 4]], [6, 4], [1, 1])
    meta = fi.builder.build(batch.prepare(reqs, num_padded=4).layout, graph_bucket=4)
    assert meta.decode[params] is wrapper and [b.data_ptr() for b in wrapper.buffers] == buffers
    assert wrapper.buffers[1][:6].tolist() == [1, 2, 3, 4, 30, 30]
    with pytest.raises(ValueError, match="decode step"):
        fi.builder.build(batch.prepare(_requests([[5]], [0], [3])).layout, graph_bucket=4)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Gemma3ForCausalLM"])
def test_engine_on_the_flashinfer_glue_matches_the_torch_backend(
    make_tiny_model: Callable[[str], Path],
    flashinfer_reference: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    arch: str,
) -> None:
    """Greedy tokens equal with chunked prefill mixing with decodes (budget 16 tokens);
    Gemma 3 alternates sliding and global layers (two plans per wrapper per step)."""
    path = str(make_tiny_model(arch))
    prompts = [[5, 6, 7], list(range(100, 140)), list(range(300, 321))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine: dict[str, Any] = dict(dtype="float32", kv_cache_memory=2**22, max_num_batched_tokens=16)
    want = [o.outputs[0].token_ids for o in LLM(path, **engine).generate(prompts, params)]

    def flashinfer(name: str, device: torch.device, spec: AttentionSpec) -> AttentionBackend:
        return FlashInferBackend(spec, device, flashinfer_reference)

    monkeypatch.setattr("pinnace.runtime.engine.setup.get_attention_backend", flashinfer)
    llm = LLM(path, **engine)
    assert llm.llm_engine.parts.runner.backend.name == "flashinfer"
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want


def test_auto_falls_back_to_torch_with_the_reason(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def missing() -> ModuleType:
        raise ImportError("No module named 'flashinfer'")

    monkeypatch.setattr(flashinfer_backend, "import_flashinfer", missing)
    spec = AttentionSpec(H, HKV, 64, torch.bfloat16, torch.bfloat16)
    cuda = torch.device("cuda")  # nothing is allocated on it: flashinfer does not import
    with caplog.at_level(logging.INFO, logger="pinnace.runtime"):
        backend = get_attention_backend("auto", cuda, spec)
    assert backend.name == "torch"
    assert "not FlashInfer: flashinfer does not import" in caplog.text
    odd = AttentionSpec(H, HKV, 80, torch.bfloat16, torch.bfloat16)
    with pytest.raises(ValueError, match="head size 80"):
        get_attention_backend("flashinfer", cuda, odd)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        get_attention_backend("flashinfer", CPU, spec)
