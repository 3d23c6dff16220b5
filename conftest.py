"""Repository-wide pytest hooks: strict mode for CI.

Suites whose tools are missing (the real llama.cpp end-to-end tests, the real Prometheus,
the Compose binary, openssl) skip with the install command, so that a developer's plain
``pytest`` stays green. In CI a skip would let a run go green without running them:
``GATEWAY_TEST_STRICT=1`` (``.ci/run`` sets it) turns every skip into a failure that
quotes the skip's reason. An expected failure (``xfail``) is not a skip and stays as it is.

This file sits at the repository root, not in ``tests/``, so that it applies to every
test directory (``tests/e2e`` included) whatever the command line names.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

STRICT_VARIABLE = "GATEWAY_TEST_STRICT"


def strict() -> bool:
    """True when skips must fail (``GATEWAY_TEST_STRICT`` is 1, true, yes or on)."""
    return os.environ.get(STRICT_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")


def _fail(report: pytest.TestReport | pytest.CollectReport) -> None:
    longrepr = report.longrepr
    # A skip's longrepr is (file, line, "Skipped: reason").
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    report.outcome = "failed"
    report.longrepr = f"{reason}\n(a skip is a failure with {STRICT_VARIABLE}=1, as in CI)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Fail a skipped test (in its body, by a marker or in a fixture) in strict mode."""
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and strict():
        _fail(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """Fail a module skipped while it is collected (``pytest.importorskip``) in strict mode."""
    report = yield
    if report.skipped and strict():
        _fail(report)
    return report
