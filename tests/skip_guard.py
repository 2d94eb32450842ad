"""In CI, a skipped test is a failed test unless its reason is on ALLOWED_SKIPS.

A skip hides a broken product as well as a missing GPU: a fixture that skips when the default
model package is missing would turn ~200 tests into skips while `make test` stays green. CI
(`.ci/run`, which runs with CI set) has every dependency the project declares, so the only
skips it may see are for hardware it cannot have. Outside CI, skips stay skips (a developer
without AVX-512 still gets a useful run).

tests/conftest.py registers this file as a plugin (loaded by path: under
`--import-mode=importlib` test folders are not importable); tests/test_skip_guard.py runs it
as the conftest of a pytester session on synthetic skips.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

# Reasons CI may skip for, matched as prefixes of the skip reason. Keep this short: each
# entry is hardware the CI machine kind does not have.
ALLOWED_SKIPS = (
    "needs a CUDA GPU",  # tests marked `gpu` (tests/conftest.py adds this skip)
    "CPU without",  # a native kernel's instruction set (AVX-512, VNNI, AMX) is absent
)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def guard(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    reason = skip_reason(report)
    if not reason.startswith(ALLOWED_SKIPS):
        report.outcome = "failed"
        report.longrepr = (
            f"skipped in CI for a reason not on the allowlist "
            f"(tests/skip_guard.py ALLOWED_SKIPS): {reason}"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    """Skips in a test, its fixtures, or its skip/skipif marks."""
    outcome = yield
    guard(outcome.get_result())  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, None]:
    """Whole-module skips: `pytest.importorskip` or `pytest.skip(allow_module_level=True)`."""
    outcome = yield
    guard(outcome.get_result())  # type: ignore[attr-defined]
