"""The CUDA paths against their references: real FlashInfer vs the torch backend (which the
CPU tests pin the torch reference of FlashInfer's API to), CUDA graphs vs eager, the FP8
KV cache, FP8 weights through torch._scaled_mm, the persistent buffers on the device."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.core.outputs import ScheduledRequest
from pinnace.runtime.layers.attention import AttentionSpec, LayerParams
from pinnace.runtime.layers.attention.flashinfer_backend import (
    FlashInferBackend,
    import_flashinfer,
)
from pinnace.runtime.layers.attention.torch_backend import TorchAttentionBackend
from pinnace.runtime.worker.input_batch import InputBatch

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
H, HKV, D, BS = 8, 2, 64, 16


def _steps(backend: Any, kv_dtype: torch.dtype, p: LayerParams) -> list[torch.Tensor]:
    """History prefill, a mixed step (2 decodes + a prompt + a chunk), a decode step."""
    g = torch.Generator().manual_seed(0)
    history, mixed = [40, 70, 0, 20], [1, 1, 33, 17]
    blocks = torch.randperm(64, generator=g).tolist()
    ids = [blocks[i * 8 : (i + 1) * 8] for i in range(4)]
    cache = torch.zeros(backend.kv_cache_shape(64, BS, HKV, D), dtype=kv_dtype, device=CUDA)
    batch = InputBatch(8, 256, 8, BS, CUDA)

    def reqs(computed: list[int], lens: list[int]) -> list[ScheduledRequest]:
        return [
            ScheduledRequest(f"r{i}", [0] * n, c, ids[i], SamplingParams(), needs_sample=True)
            for i, (c, n) in enumerate(zip(computed, lens, strict=True))
            if n
        ]

    outs = []
    after = [h + m for h, m in zip(history, mixed, strict=True)]
    for sched in (reqs([0] * 4, history), reqs(history, mixed), reqs(after, [1] * 4)):
        layout = batch.prepare(sched).layout
        meta = backend.build_metadata(layout)
        t = sum(layout.query_lens)
        q, k, v = (torch.randn(t, n, D, generator=g).bfloat16().to(CUDA) for n in (H, HKV, HKV))
        outs.append(backend.forward(q, k, v, cache, meta, p.scale, p.sliding_window, p.softcap))
    return outs


@pytest.mark.parametrize(
    ("kv_dtype", "params"),
    [
        (torch.bfloat16, LayerParams(D**-0.5)),
        (torch.bfloat16, LayerParams(D**-0.5, 24)),
        (torch.bfloat16, LayerParams(D**-0.5, None, 30.0)),
        (torch.float8_e4m3fn, LayerParams(D**-0.5, 24)),
    ],
    ids=["plain", "window", "softcap", "fp8kv"],
)
def test_flashinfer_matches_the_torch_backend(kv_dtype: torch.dtype, params: LayerParams) -> None:
    spec = AttentionSpec(H, HKV, D, torch.bfloat16, kv_dtype, (params,))
    got = _steps(FlashInferBackend(spec, CUDA, import_flashinfer()), kv_dtype, params)
    want = _steps(TorchAttentionBackend(HKV), kv_dtype, params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def _greedy(path: Path, **engine: Any) -> list[list[int]]:
    llm = LLM(str(path), dtype="bfloat16", gpu_memory_utilization=0.3, **engine)
    prompts = [[5, 6, 7], list(range(100, 160)), list(range(200, 233))]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"])
def test_cuda_graphs_replay_the_eager_tokens(
    make_gpu_model: Callable[..., Path], arch: str
) -> None:
    """FlashInfer with decode graphs vs eager: the same kernels, so the same tokens; and
    chunked prefill mixing with decodes (budget 32 tokens)."""
    path = make_gpu_model(arch)
    graphs = _greedy(path, attention_backend="flashinfer", max_num_batched_tokens=32)
    eager = _greedy(
        path, attention_backend="flashinfer", max_num_batched_tokens=32, enforce_eager=True
    )
    assert graphs == eager


def test_flashinfer_engine_close_to_torch_backend(make_gpu_model: Callable[..., Path]) -> None:
    """bf16 near-ties may flip a token, so: most positions agree."""
    path = make_gpu_model("Qwen2ForCausalLM")
    fi = _greedy(path, attention_backend="flashinfer")
    ref = _greedy(path, attention_backend="torch")
    same = sum(a == b for x, y in zip(fi, ref, strict=True) for a, b in zip(x, y, strict=True))
    assert same / sum(len(x) for x in ref) >= 0.9


def test_fp8_kv_cache_on_flashinfer(make_gpu_model: Callable[..., Path]) -> None:
    path = make_gpu_model("LlamaForCausalLM")
    fp8 = _greedy(path, attention_backend="flashinfer", kv_cache_dtype="fp8")
    bf16 = _greedy(path, attention_backend="flashinfer")
    same = sum(a == b for x, y in zip(fp8, bf16, strict=True) for a, b in zip(x, y, strict=True))
    assert same / sum(len(x) for x in bf16) >= 0.8


def test_input_batch_buffers_on_the_device() -> None:
    batch = InputBatch(4, 32, 4, BS, CUDA)
    assert batch.input_ids_cpu.is_pinned() and batch.input_ids.is_cuda
    addresses = [batch.input_ids.data_ptr(), batch.step_block_table.data_ptr()]
    for step in range(3):
        req = ScheduledRequest("a", [7], 5 + step, [3], SamplingParams(), needs_sample=True)
        inputs = batch.prepare([req], num_padded=2)
        assert inputs.positions.tolist() == [5 + step, 0]
        assert inputs.layout.slot_mapping.tolist() == [3 * BS + 5 + step, 0]
    assert [batch.input_ids.data_ptr(), batch.step_block_table.data_ptr()] == addresses


def test_fp8_weights_use_scaled_mm_on_sm89() -> None:
    from pinnace.runtime.layers.quantization.fp8 import Fp8Linear, quantize_fp8

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a CUDA GPU with FP8 tensor cores (sm89+)")
    w = torch.randn(256, 512, device=CUDA)
    layer = Fp8Linear(*quantize_fp8(w), None)
    assert layer.use_scaled_mm
    x = torch.randn(64, 512, device=CUDA, dtype=torch.bfloat16)
    ref = x.float() @ layer.dequantized_weight().t()
    out = layer(x)
    assert layer.use_scaled_mm  # no fallback happened
    assert float((out.float() - ref).abs().max() / ref.abs().max()) < 0.05


def test_int8_weights_use_int_mm_for_prefill() -> None:
    from pinnace.runtime.layers.quantization.int8 import Int8Linear, quantize_int8

    w = torch.randn(256, 512, device=CUDA)
    layer = Int8Linear(*quantize_int8(w), None, torch.bfloat16)
    x = torch.randn(64, 512, device=CUDA, dtype=torch.bfloat16)
    ref = x.float() @ layer.dequantized_weight().t()
    out = layer(x)
    assert layer.use_int_mm  # _int_mm ran (a failure turns it off)
    assert float((out.float() - ref).abs().max() / ref.abs().max()) < 0.03
