"""AsyncLLMEngine without HTTP: ordered streams, abort on exit, queue limit, step failures."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.core.outputs import Logprobs, RequestUpdate
from pinnace.runtime.engine.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    EngineStepError,
    QueueFullError,
)
from pinnace.runtime.engine.llm_engine import LLMEngine
from pinnace.runtime.engine.output_processor import OutputProcessor

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


def test_sample_ended_by_a_stop_string_takes_no_more_tokens(llm: LLM) -> None:
    """Across processes the core learns of a stop string a step after the front end
    found it, so one more step's tokens for that sample arrive: they are dropped (text,
    tokens, finish reason and cumulative logprob stay as the stop left them)."""
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
    prompt = "Once upon"

    async def body(engine: AsyncLLMEngine) -> Any:
        async with engine.generate("s", engine.tokenize(prompt), params) as stream:
            return [out async for out in stream][-1]

    free = run_with(llm.llm_engine, body).outputs  # both samples, never stopped
    text = free[0].text
    # A stop string sample 0 completes a few tokens in, while sample 1 runs on.
    stop = next(text[i : i + 2] for i in range(2, len(text)) if text[i : i + 2].strip())
    assert stop not in free[1].text[: text.index(stop) + 2]

    engine = llm.llm_engine
    processor = OutputProcessor(engine.tokenizer)
    stopped_params = replace(params, stop=[stop], logprobs=0)
    prompt_ids = engine.tokenize(prompt)
    max_tokens = engine.validate(prompt_ids, stopped_params)
    processor.add_request("s", None, prompt_ids, stopped_params, max_tokens)
    final, stopped_at = None, None
    for step in range(16):
        updates = [
            RequestUpdate(
                f"s#{i}",
                [sample.token_ids[step]],
                "length" if step == 15 else None,
                logprobs=[Logprobs(-1.0, {})],
            )
            for i, sample in enumerate(free)
            # The core stops sample 0 one step after the front end asked it to.
            if i == 1 or stopped_at is None or step <= stopped_at + 1
        ]
        processed = processor.process(updates)
        if processed.stopped:
            assert processed.stopped == ["s#0"] and stopped_at is None
            stopped_at = step
        if processed.outputs:
            final = processed.outputs[-1]
    assert stopped_at is not None and final is not None and final.finished
    out = final.outputs[0]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert out.text == text[: text.index(stop)]
    assert out.token_ids == free[0].token_ids[: stopped_at + 1]
    assert out.logprobs is not None and len(out.logprobs) == stopped_at + 1
    assert out.cumulative_logprob == -1.0 * (stopped_at + 1)
    assert final.outputs[1].token_ids == free[1].token_ids


def test_utility_call_in_flight_at_shutdown_fails(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call the core never answers (it is stopped first) ends with EngineDeadError."""
    engine = llm.llm_engine
    release = threading.Event()
    entered = threading.Event()

    def stuck() -> bool:
        entered.set()
        release.wait(10)
        return True

    monkeypatch.setattr(engine.core, "reset_prefix_cache", stuck)

    async def main() -> None:
        async_engine = AsyncLLMEngine(engine)
        async_engine.start()
        call = asyncio.create_task(async_engine._call("reset_prefix_cache"))
        await asyncio.to_thread(entered.wait, 10)
        async_engine.shutdown(timeout=0.1)  # the core is busy with the call: not joined
        with pytest.raises(EngineDeadError, match="shut down"):
            await asyncio.wait_for(call, 5)

    try:
        asyncio.run(main())
    finally:
        release.set()
