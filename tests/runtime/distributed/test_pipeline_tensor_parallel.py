"""TP=2 x PP=2: 4 ranks the engine starts itself (its own process group, so its own
module), one KV head for two tensor ranks; a killed stage worker fails the engine loudly."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.executor.executor import WorkerDiedError
from pinnace.runtime.executor.multiproc import MultiprocExecutor

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# A small step budget (chunked prefill) and few blocks (preemption when all run at once).
ENGINE: dict[str, Any] = dict(dtype="float32", max_num_batched_tokens=32, num_kv_blocks=14,
                              block_size=8, max_model_len=96)  # fmt: skip
IDS: list[Any] = [
    [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 30, 31],
    [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 40, 41, 42],
    [100 + i % 37 for i in range(70)],
]


@pytest.mark.slow
def test_tp2_x_pp2_then_a_dead_stage_fails_loudly(four_layers: Path) -> None:
    """4 ranks started by the engine (~10 s of process start-up on a quiet machine, more
    on a loaded one): one KV head for two tensor ranks, two stages. Then a last-stage
    worker is killed mid-generation: the engine raises instead of hanging."""
    single = LLM(str(four_layers), **ENGINE)
    expected = [list(o.outputs[0].token_ids) for o in single.generate(IDS, GREEDY)]
    single.shutdown()
    llm = LLM(str(four_layers), tensor_parallel_size=2, pipeline_parallel_size=2, **ENGINE)
    executor = llm.llm_engine.core.executor
    assert isinstance(executor, MultiprocExecutor)
    try:
        assert executor.world_size == 4
        assert [list(o.outputs[0].token_ids) for o in llm.generate(IDS, GREEDY)] == expected
        stats = llm.llm_engine.core.stats()
        assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
        # A quarter of the weights each, plus the replicated KV head and norms.
        full, per_rank = (
            single.llm_engine.parts.weight_bytes,
            llm.llm_engine.parts.rank_weight_bytes,
        )
        assert per_rank is not None and len(per_rank) == 4
        assert all(0.22 * full < b < 0.3 * full for b in per_rank), (per_rank, full)
        victim = executor.workers[-1]  # rank 3: stage 1, tensor rank 1
        threading.Timer(0.5, victim.kill).start()
        long = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
        started = time.monotonic()
        with pytest.raises(WorkerDiedError):
            for _ in range(200):  # until the kill lands, mid-step or between steps
                llm.generate(IDS[:2], long, use_tqdm=False)
        assert time.monotonic() - started < 30
    finally:
        llm.shutdown()
