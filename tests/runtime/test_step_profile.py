"""The step profile (PINNACE_PROFILE_DIR): an engine's steps are timed per phase and by
batch size, and the summary is written as JSON; unset, the profile is a null object."""

from __future__ import annotations

import gc
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


def test_garbage_collections_are_timed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(step_profile.ENV, str(tmp_path))
    monkeypatch.setattr(step_profile, "_profiles", {})
    prof = step_profile.profile("frontend")
    assert isinstance(prof, StepProfile)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(prof.on_gc)
    prof.dump()  # (and not at exit)
    (path,) = tmp_path.glob("frontend-*.json")
    gc2 = json.loads(path.read_text())["phases"]["gc2"]
    assert gc2["n"] == 1 and gc2["total"] > 0


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
    by_tokens = summary["execute_by_tokens"]
    assert by_tokens["2"]["n"] == 4 and sum(s["n"] for s in by_tokens.values()) == 5
    tokenizer = llm.get_tokenizer()
    num_prompt = len(tokenizer.encode("Hello there")) + len(tokenizer.encode("One two three"))
    assert phases["step_tokens"]["total"] == num_prompt + 2 * 4
    assert 0 < phases["execute"]["p50"] <= phases["execute"]["p99"]
    assert summary["cpu_s"] > 0 and summary["wall_s"] > 0


def test_samples_are_capped_but_counted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A long-running server keeps only the last MAX_SAMPLES per phase (percentiles over
    them) while count and total cover every sample."""
    monkeypatch.setattr(step_profile, "MAX_SAMPLES", 4)
    prof = StepProfile("core", str(tmp_path))
    for i in range(1, 11):
        prof.add("decode", float(i))
        prof.step(3, 3, False, float(i))
    assert len(prof.phases["decode"].recent) == 4 and prof.phases["decode"][-1] == 10.0
    summary = prof.summary()
    for stats in (summary["phases"]["decode"], summary["execute_by_batch"]["3"]):
        assert stats["n"] == 10 and stats["total"] == 55.0 and stats["mean"] == 5.5
        assert stats["p50"] == 9.0 and stats["p99"] == 10.0  # of the last 4: 7..10
