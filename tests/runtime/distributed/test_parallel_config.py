"""Parallel EngineConfig fields, the model-split checks and the executor's lifetime: fast,
no processes."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from pinnace.runtime.config import EngineConfig
from pinnace.runtime.distributed import parallel_state
from pinnace.runtime.distributed.model_split import check_model_split
from pinnace.runtime.engine import engine_core
from pinnace.runtime.executor import multiproc
from pinnace.runtime.executor.executor import Executor, InprocExecutor


def test_sizes_above_one_are_accepted_at_config_level() -> None:
    config = EngineConfig(model="m", tensor_parallel_size=8, pipeline_parallel_size=2,
                          nnodes=2, node_rank=1, master_addr="leader")  # fmt: skip
    assert (config.world_size, config.local_world_size, config.master_port) == (16, 8, 29500)
    single = EngineConfig(model="m", tensor_parallel_size=2)
    assert (single.world_size, single.local_world_size, single.master_port) == (2, 2, None)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"tensor_parallel_size": 0}, "tensor_parallel_size must be a positive integer"),
     ({"nnodes": 2, "tensor_parallel_size": 3, "master_addr": "h"}, "split evenly"),
     ({"nnodes": 2, "tensor_parallel_size": 2}, "needs master_addr"),
     ({"node_rank": 1}, "node_rank must be in 0..0"),
     ({"master_port": 70000}, "master_port")],
)  # fmt: skip
def test_bad_parallel_config(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        EngineConfig(model="m", **kwargs)  # type: ignore[arg-type]


def _cfg(heads: int, kv: int, inter: int = 64, layers: int = 2) -> SimpleNamespace:
    return SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv,
                           intermediate_size=inter, num_hidden_layers=layers)  # fmt: skip


def test_model_split() -> None:
    check_model_split(_cfg(4, 2), 2, 1)
    check_model_split(_cfg(4, 1), 4, 2)  # one KV head replicated on every rank
    check_model_split(_cfg(8, 2), 4, 1)
    with pytest.raises(ValueError, match="must divide the model's 6 attention heads"):
        check_model_split(_cfg(6, 6), 4, 1)
    with pytest.raises(ValueError, match="3 KV heads"):
        check_model_split(_cfg(12, 3), 4, 1)
    with pytest.raises(ValueError, match="intermediate_size"):
        check_model_split(_cfg(4, 2, inter=66), 4, 1)
    with pytest.raises(ValueError, match="exceeds the model's 2 layers"):
        check_model_split(_cfg(4, 2), 1, 3)


@pytest.mark.parametrize(
    ("architecture", "kwargs"),
    [("LlamaForCausalLM", {"runner": "pooling"}), ("LlamaForCausalLM", {"convert": "embed"}),
     ("Qwen2Model", {}), ("GteEmbeddingModel", {})],
)  # fmt: skip
def test_embedding_engine_with_ranks_is_refused_before_any_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, architecture: str, kwargs: dict[str, Any]
) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [architecture]}))

    def no_ranks(config: EngineConfig) -> Any:
        raise AssertionError("ranks started for an engine that is refused")

    monkeypatch.setattr(engine_core, "make_executor", no_ranks)
    config = EngineConfig(model=str(tmp_path), tensor_parallel_size=2, **kwargs)
    with pytest.raises(ValueError, match=r"embedding model .* tensor_parallel_size=1"):
        engine_core.EngineCore(config)
    # An embedding model on one rank passes; so does a generating model with ranks.
    engine_core.refuse_parallel_pooling(EngineConfig(model=str(tmp_path), **kwargs))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    engine_core.refuse_parallel_pooling(EngineConfig(model=str(tmp_path), tensor_parallel_size=2))


def test_the_core_stops_its_ranks_when_start_up_fails_or_it_is_dropped(
    make_tiny_model: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The executor (here one rank that counts its shutdowns) never outlives its core."""
    stopped: list[Executor] = []

    class Counted(InprocExecutor):
        def shutdown(self) -> None:
            stopped.append(self)

    monkeypatch.setattr(engine_core, "make_executor", Counted)
    config = EngineConfig(model=str(make_tiny_model("LlamaForCausalLM")), num_kv_blocks=8)

    def broken_scheduler(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("start-up fault")

    with monkeypatch.context() as patch:
        patch.setattr(engine_core, "Scheduler", broken_scheduler)
        with pytest.raises(RuntimeError, match="start-up fault"):
            engine_core.EngineCore(config)
    assert len(stopped) == 1
    core = engine_core.EngineCore(config)
    assert len(stopped) == 1
    del core  # nobody shut it down
    gc.collect()
    assert len(stopped) == 2


def test_a_cuda_rank_makes_its_own_gpu_current_before_joining(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """nccl puts a rank's communicator on the current GPU: cuda:<local rank>, set first."""
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(
        parallel_state.dist,
        "init_process_group",
        lambda backend, **kw: calls.append(("init", backend)),
    )
    monkeypatch.setattr(parallel_state.dist, "new_group", lambda **kw: "cpu group")
    # No rank 0 to reach here: a store that has its layout.
    layout = parallel_state._layout(4, 4, 2).encode()
    store = SimpleNamespace(add=lambda key, amount: amount, wait=lambda keys: None,
                            get=lambda key: layout)  # fmt: skip
    monkeypatch.setattr(parallel_state, "_connect_store", lambda *args: store)
    config = EngineConfig(model="m", tensor_parallel_size=4, nnodes=2, node_rank=1,
                          master_addr="leader", device="cpu")  # fmt: skip
    monkeypatch.setattr(config, "device", "cuda")
    monkeypatch.setattr(multiproc, "resolve_device", lambda name: torch.device(name))
    device = multiproc.rank_device(config, 3)  # node 1's second rank
    assert device == torch.device("cuda", 1)
    parallel_state.init_group(3, 4, 4, "leader", 29500, device, config.nnodes)
    assert calls == [("set_device", device), ("init", "nccl")]
