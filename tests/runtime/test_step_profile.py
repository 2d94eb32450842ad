"""The step profile (PINNACE_PROFILE_DIR): an engine's steps are timed per phase and by
batch size, and the summary is written as JSON; unset, the profile is a null object."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.engine import step_profile
from pinnace.runtime.engine.step_profile import StepProfile


def test_unset_is_a_null_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(step_profile.ENV, raising=False)
    monkeypatch.setattr(step_profile, "_profiles", {})
    prof = step_profile.profile("core")
    assert not prof.enabled and not isinstance(prof, StepProfile)
    assert step_profile.profile("core") is prof


def test_engine_steps_are_timed_by_phase_and_batch(
    make_tiny_model: Callable[[str], Path], tmp_path: Path
) -> None:
    llm = LLM(str(make_tiny_model("LlamaForCausalLM")), dtype="float32", kv_cache_memory=2**25)
    prof = StepProfile("offline", str(tmp_path))
    llm.llm_engine.core.profile = prof  # type: ignore[union-attr]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    llm.generate(["Hello there", "One two three"], params, use_tqdm=False)
    prof.dump()
    (path,) = tmp_path.glob("offline-*.json")
    summary = json.loads(path.read_text())
    phases = summary["phases"]
    # One prefill step of both prompts, then 4 decode steps of both.
    for name in ("schedule", "execute", "execute_cpu", "update"):
        assert phases[name]["n"] == 5, name
    assert summary["execute_by_batch"]["2+prompt"]["n"] == 1
    assert summary["execute_by_batch"]["2"]["n"] == 4
    tokenizer = llm.get_tokenizer()
    num_prompt = len(tokenizer.encode("Hello there")) + len(tokenizer.encode("One two three"))
    assert phases["step_tokens"]["total"] == num_prompt + 2 * 4
    assert 0 < phases["execute"]["p50"] <= phases["execute"]["p99"]
    assert summary["cpu_s"] > 0 and summary["wall_s"] > 0
