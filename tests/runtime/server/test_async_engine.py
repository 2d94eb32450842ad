"""AsyncLLMEngine without HTTP: ordered streams, abort on exit, queue limit, step failures."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.engine.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    EngineStepError,
    QueueFullError,
)
from pinnace.runtime.engine.llm_engine import LLMEngine

GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def llm(tiny_model: Path) -> LLM:
    return LLM(str(tiny_model), kv_cache_memory=64 * 2**20, max_num_seqs=2)


def run_with(
    engine: LLMEngine, body: Callable[[AsyncLLMEngine], Awaitable[Any]], **kwargs: Any
) -> Any:
    async def main() -> Any:
        async_engine = AsyncLLMEngine(engine, **kwargs)
        async_engine.start()
        try:
            return await body(async_engine)
        finally:
            async_engine.shutdown()

    return asyncio.run(main())


async def settle(engine: AsyncLLMEngine) -> None:
    """Wait until the engine thread has nothing left (stats are published per command)."""
    for _ in range(400):
        s = engine.stats()
        if s.num_running_reqs == 0 and s.num_waiting_reqs == 0 and s.kv_cache_usage == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine did not settle: {engine.stats()}")


def test_stream_equals_llm_generate(llm: LLM) -> None:
    expected = llm.generate(["Hello there"], GREEDY, use_tqdm=False)[0].outputs[0]

    async def body(engine: AsyncLLMEngine) -> list[Any]:
        ids = engine.tokenize("Hello there")
        async with engine.generate("r1", ids, GREEDY) as stream:
            return [out async for out in stream]

    outputs = run_with(llm.llm_engine, body)
    assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    assert outputs[-1].outputs[0].text == expected.text
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    assert lengths == sorted(lengths) and lengths[-1] == 12


def test_leaving_early_aborts_and_frees_kv(llm: LLM) -> None:
    params = SamplingParams(max_tokens=500, ignore_eos=True)

    async def body(engine: AsyncLLMEngine) -> tuple[float, int]:
        async with engine.generate("long", engine.tokenize("Once"), params) as stream:
            async for out in stream:
                if len(out.outputs[0].token_ids) >= 3:
                    break
            usage = engine.stats().kv_cache_usage
        await settle(engine)
        return usage, llm.llm_engine.num_unfinished_requests()

    usage, left = run_with(llm.llm_engine, body)
    assert usage > 0 and left == 0


def test_cancelled_task_aborts(llm: LLM) -> None:
    params = SamplingParams(max_tokens=500, ignore_eos=True)

    async def body(engine: AsyncLLMEngine) -> int:
        async def consume() -> None:
            async with engine.generate("c", engine.tokenize("Once"), params) as stream:
                async for _ in stream:
                    pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await settle(engine)
        return llm.llm_engine.num_unfinished_requests()

    assert run_with(llm.llm_engine, body) == 0


def test_waiting_limit_and_duplicate_ids(llm: LLM) -> None:
    params = SamplingParams(max_tokens=300, ignore_eos=True)

    async def body(engine: AsyncLLMEngine) -> None:
        ids = engine.tokenize("Hi")
        async with (
            engine.generate("a", ids, params),
            engine.generate("b", ids, params),
            engine.generate("c", ids, params),
        ):
            # max_num_seqs=2: "c" waits (or is still in flight), so a fourth is refused.
            with pytest.raises(QueueFullError, match="max_waiting_requests=1"):
                async with engine.generate("d", ids, params):
                    pass
            with pytest.raises(ValueError, match="already in use"):
                async with engine.generate("a", ids, params):
                    pass
        await settle(engine)

    run_with(llm.llm_engine, body, max_waiting_requests=1)


def test_failed_step_fails_its_requests_and_engine_goes_on(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = llm.llm_engine
    real_step = engine.core.step  # what the engine thread steps
    calls = {"n": 0}

    def flaky_step() -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real_step()

    monkeypatch.setattr(engine.core, "step", flaky_step)

    async def body(async_engine: AsyncLLMEngine) -> str:
        ids = async_engine.tokenize("Hi")
        with pytest.raises(EngineStepError, match="boom"):
            async with async_engine.generate("x", ids, GREEDY) as stream:
                async for _ in stream:
                    pass
        await settle(async_engine)
        async with async_engine.generate("y", ids, GREEDY) as stream:
            outs = [o async for o in stream]
        return outs[-1].outputs[0].finish_reason

    assert run_with(engine, body) == "length"


def test_health_after_shutdown(llm: LLM) -> None:
    async def body() -> None:
        engine = AsyncLLMEngine(llm.llm_engine)
        with pytest.raises(EngineDeadError):
            engine.check_health()
        engine.start()
        engine.check_health()
        engine.shutdown()
        with pytest.raises(EngineDeadError):
            async with engine.generate("z", [1, 2], GREEDY):
                pass

    asyncio.run(body())
    with pytest.raises(ValueError, match="max_waiting_requests"):
        AsyncLLMEngine(llm.llm_engine, max_waiting_requests=0)


def test_shutdown_ends_open_streams(llm: LLM) -> None:
    params = SamplingParams(max_tokens=500, ignore_eos=True)

    async def body() -> int:
        engine = AsyncLLMEngine(llm.llm_engine)
        engine.start()
        with pytest.raises(EngineDeadError, match="shut down"):
            async with engine.generate("s", engine.tokenize("Once"), params) as stream:
                async for out in stream:
                    if len(out.outputs[0].token_ids) == 2:
                        engine.shutdown()
        return llm.llm_engine.num_unfinished_requests()

    assert asyncio.run(body()) == 0
