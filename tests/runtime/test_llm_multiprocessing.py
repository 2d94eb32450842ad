"""`LLM(..., enable_multiprocessing=True)`: the engine core in a process of its own (as
`pinnace serve` runs it) gives what the in-process engine gives, and its end is clean:
shutdown stops the process, a killed core is an error, not a hang."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.engine.mp_llm_engine import MPLLMEngine
from pinnace.runtime.engine.streams import EngineDeadError

KV = 32 * 2**20
PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time"]


@pytest.fixture(scope="module")
def path(make_tiny_model: Callable[[str], Path]) -> str:
    return str(make_tiny_model("LlamaForCausalLM"))


def core_pid(llm: LLM) -> int:
    assert isinstance(llm.llm_engine, MPLLMEngine)
    pid = llm.llm_engine.client.process.pid
    assert pid is not None
    return pid


def test_core_process_generates_as_in_process(path: str) -> None:
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=12, n=2, temperature=1.0, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2),
    ]
    inproc = LLM(path, dtype="float32", kv_cache_memory=KV)
    expected = inproc.generate(PROMPTS, params, use_tqdm=False)
    # A stop string the greedy text reaches (found in the front end, a step after the core).
    text = expected[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stop_params = SamplingParams(max_tokens=12, temperature=0.0, stop=[stop])
    stopped = inproc.generate(PROMPTS[0], stop_params, use_tqdm=False)

    llm = LLM(path, dtype="float32", kv_cache_memory=KV, enable_multiprocessing=True)
    try:
        pid = core_pid(llm)
        assert pid != os.getpid()
        os.kill(pid, 0)  # alive
        got = llm.generate(PROMPTS, params, use_tqdm=False)
        for want, out in zip(expected, got, strict=True):
            assert [c.token_ids for c in out.outputs] == [c.token_ids for c in want.outputs]
            assert [c.text for c in out.outputs] == [c.text for c in want.outputs]
        mp_logprobs, want_logprobs = got[2].outputs[0].logprobs, expected[2].outputs[0].logprobs
        assert mp_logprobs is not None and want_logprobs is not None
        for mine, theirs in zip(mp_logprobs, want_logprobs, strict=True):
            assert mine.keys() == theirs.keys()
            assert list(mine.values()) == pytest.approx(list(theirs.values()), abs=1e-4)
        again = llm.generate(PROMPTS[0], stop_params, use_tqdm=False)
        assert again[0].outputs[0].text == stopped[0].outputs[0].text
        assert again[0].outputs[0].finish_reason == "stop"
        assert llm.llm_engine.num_unfinished_requests() == 0
    finally:
        llm.shutdown()
    assert not llm.llm_engine.client.process.is_alive()  # type: ignore[union-attr]
    with pytest.raises(EngineDeadError):
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=2), use_tqdm=False)


def test_killed_core_is_an_error_not_a_hang(path: str) -> None:
    llm = LLM(path, dtype="float32", kv_cache_memory=KV, enable_multiprocessing=True)
    try:
        os.kill(core_pid(llm), signal.SIGKILL)
        with pytest.raises(EngineDeadError):
            llm.generate(PROMPTS, SamplingParams(max_tokens=400, ignore_eos=True), False)
    finally:
        llm.shutdown()


def test_in_process_is_the_default(path: str) -> None:
    llm = LLM(path, dtype="float32", kv_cache_memory=KV)
    assert not isinstance(llm.llm_engine, MPLLMEngine)
