"""runtime/kernels/build.py: every kernel source compiles, a prebuilt cache serves a machine
without a compiler, a corrupt cached build is rebuilt, and a failed build is a warning and
PyTorch's path, never an error."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pinnace.runtime.kernels import build
from pinnace.runtime.kernels.int8_gemv import REQUIRED_CPU_FLAGS


def test_every_kernel_source_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the CPU image runs at build time: each kernel in build.KERNELS compiles."""
    if build.compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("PINNACE_KERNEL_CACHE", str(tmp_path))
    build.build_all()
    assert sorted(p.name.split("-")[0] for p in tmp_path.glob("*.so")) == sorted(build.KERNELS)


def test_build_cache_serves_a_machine_without_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if not set(REQUIRED_CPU_FLAGS) <= build.cpu_flags():
        pytest.skip(f"CPU without {', '.join(REQUIRED_CPU_FLAGS)}")
    if build.compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("PINNACE_KERNEL_CACHE", str(tmp_path / "kernels"))
    assert build.load("int8_gemv") is not None  # a compiler and the ISA: it must build
    built = list((tmp_path / "kernels").glob("int8_gemv-*.so"))
    assert len(built) == 1
    # A container image: the build is in the cache, and there is no compiler.
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CC", raising=False)
    assert build.load("int8_gemv") is not None
    # A truncated cached build (an interrupted copy) is rebuilt, not trusted. In a new
    # process: this one has the library mapped, and dlopen would return that mapping.
    monkeypatch.undo()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / built[0].name).write_bytes(b"truncated")
    probe = "from pinnace.runtime.kernels import build; print(build.load('int8_gemv') is not None)"
    env = {**os.environ, "PINNACE_KERNEL_CACHE": str(broken)}
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.stdout.strip() == "True", result.stderr
    assert "rebuilding" in result.stderr
    assert (broken / built[0].name).stat().st_size > 1000
    # Empty cache and a compiler that fails: a warning and PyTorch's path, no exception.
    monkeypatch.setenv("PINNACE_KERNEL_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("CC", "false")
    with caplog.at_level(logging.WARNING):
        assert build.load("int8_gemv") is None
    assert "not built" in caplog.text
    assert not list((tmp_path / "empty").glob("*.so*"))
