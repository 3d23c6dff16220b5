"""ProviderBreaker on its own: thresholds, one half-open trial, long opens, probes, TZ."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from breakers import ProviderBreaker, State


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make(fail_max=3, reset=10.0):
    clock = Clock()
    return ProviderBreaker("p", fail_max, reset, clock=clock), clock


def fail(breaker, n=1, **kw):
    for _ in range(n):
        permit = breaker.try_acquire()
        assert permit is not None
        breaker.record_failure(permit, **kw)


def test_opens_after_fail_max_consecutive_failures():
    b, _ = make()
    fail(b, 2)
    assert b.state is State.CLOSED and b.fail_counter == 2
    b.record_success(b.try_acquire())
    assert b.fail_counter == 0
    fail(b, 3)
    assert b.state is State.OPEN
    assert b.try_acquire() is None
    assert b.retry_in() == pytest.approx(10.0)


def test_exactly_one_trial_when_half_open():
    b, clock = make()
    fail(b, 3)
    clock.now += 10
    assert b.state is State.HALF_OPEN
    trial = b.try_acquire()
    assert trial is not None and trial.trial
    assert [b.try_acquire() for _ in range(20)] == [None] * 20
    b.record_success(trial)
    assert b.state is State.CLOSED
    assert b.try_acquire() is not None


def test_failed_trial_reopens():
    b, clock = make()
    fail(b, 3)
    clock.now += 10
    trial = b.try_acquire()
    b.record_failure(trial)
    assert b.state is State.OPEN
    assert b.retry_in() == pytest.approx(10.0)


def test_neutral_trial_lets_the_next_request_try():
    b, clock = make()
    fail(b, 3)
    clock.now += 10
    trial = b.try_acquire()
    b.release(trial)  # e.g. the client went away
    assert b.state is State.HALF_OPEN
    assert b.try_acquire() is not None


def test_open_for_overrides_threshold():
    b, clock = make(fail_max=5)
    fail(b, 1, open_for=300.0)  # insufficient_quota
    assert b.state is State.OPEN
    assert b.retry_in() == pytest.approx(300.0)
    clock.now += 299
    assert b.try_acquire() is None
    clock.now += 1
    assert b.try_acquire() is not None


def test_a_verdict_counts_once_per_permit():
    b, _ = make()
    permit = b.try_acquire()
    b.record_failure(permit)
    b.record_failure(permit)
    b.record_success(permit)
    assert b.fail_counter == 1


def test_probe_feedback():
    b, clock = make(fail_max=2)
    b.probe_failed()
    b.probe_failed()
    assert b.state is State.OPEN
    b.probe_succeeded()  # back before reset_timeout: the next request is the trial
    assert b.state is State.HALF_OPEN
    assert b.fail_counter == 2  # a probe is not a success of user traffic
    trial = b.try_acquire()
    assert trial is not None
    b.probe_failed()  # the trial in flight decides, not the probe
    assert b.state is State.HALF_OPEN
    b.record_success(trial)
    assert b.state is State.CLOSED
    b.probe_failed(unreachable=True)  # connection refused: switched off, open at once
    assert b.state is State.OPEN and b.fail_counter == 1


def test_transitions_reach_listeners():
    from aiobreaker import CircuitBreakerListener

    from breakers.breaker import state_of

    seen = []

    class L(CircuitBreakerListener):
        def state_change(self, cb, old, new):
            seen.append((state_of(old).value, state_of(new).value))

    clock = Clock()
    b = ProviderBreaker("p", 1, 5, listeners=[L()], clock=clock)
    fail(b)
    clock.now += 5
    b.record_success(b.try_acquire())
    assert seen == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


SCRIPT = textwrap.dedent(
    """
    import time, warnings
    from datetime import UTC, datetime
    warnings.simplefilter("error")
    from breakers import ProviderBreaker, State
    b = ProviderBreaker("p", fail_max=1, reset_timeout=0.3)
    b.record_failure(b.try_acquire())
    assert b.state is State.OPEN, b.state
    opened = b.opened_at
    assert opened.tzinfo is not None
    assert abs((datetime.now(UTC) - opened).total_seconds()) < 5, opened
    reopen = (b.reopen_at() - opened).total_seconds()
    assert 0.2 < reopen <= 0.31, reopen
    assert 0.2 < b.retry_in() <= 0.3
    time.sleep(0.35)
    assert b.state is State.HALF_OPEN, b.state
    print("ok", time.strftime("%Z"))
    """
)


@pytest.mark.parametrize("tz", ["America/New_York", "Asia/Ho_Chi_Minh", "UTC"])
def test_correct_in_any_timezone(tz):
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", SCRIPT],
        env={"TZ": tz, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")
