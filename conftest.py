"""Repository-wide pytest hooks: strict mode for CI, and where xdist runs what.

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
from typing import Any

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


#: Node ids of the end-to-end tests: real llama.cpp servers, started once per worker.
E2E_PREFIX = "tests/e2e/"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under pytest-xdist, every end-to-end test goes to one worker, so that their llama.cpp
    servers start once and two never compete with two more; any other test is a unit of its
    own, spread as ``--dist load`` would (whatever ``--dist`` says).

    Not ``xdist_group`` with ``--dist loadgroup``: with pytest 9.2 that grouping silently
    does nothing (pytest-xdist issue 1386), and both workers started their own servers."""
    from xdist.scheduler import LoadScopeScheduling

    class E2ETogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "e2e" if nodeid.startswith(E2E_PREFIX) else nodeid

    return E2ETogether(config, log)
