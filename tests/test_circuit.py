"""The circuit breaker's state machine, on a Clock."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from mailgate.circuit import CircuitBreaker, CircuitPolicy, CircuitState

POLICY = CircuitPolicy(failures=3, cooldown=10, max_cooldown=35)


def breaker(clock: Clock) -> CircuitBreaker:
    return CircuitBreaker("main", clock, POLICY)


def fail(b: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        assert b.allow()
        b.record_failure()


def test_opens_after_consecutive_failures() -> None:
    """Below the threshold the provider is still used; at it, the circuit opens and refuses."""
    b = breaker(Clock())
    fail(b, 2)
    assert b.state is CircuitState.CLOSED and b.allow()
    b.record_failure()
    assert b.state is CircuitState.OPEN
    assert not b.allow()


def test_success_or_permanent_answer_resets_the_count() -> None:
    """Failures must be consecutive: an answer in between starts the count again."""
    b = breaker(Clock())
    fail(b, 2)
    b.record_success()
    fail(b, 2)
    assert b.state is CircuitState.CLOSED
    assert b.consecutive_failures == 2


def test_half_open_lets_one_probe_through_after_the_cooldown() -> None:
    """Past the cool-down exactly one message is let through; the rest keep failing over."""
    clock = Clock()
    b = breaker(clock)
    fail(b, 3)
    clock.advance(9.9)
    assert not b.allow()
    assert b.retry_in() == pytest.approx(0.1)
    clock.advance(0.1)
    assert b.allow()
    assert b.state is CircuitState.HALF_OPEN
    assert not b.allow()
    assert not b.allow()


def test_successful_probe_closes() -> None:
    """A probe that gets an answer closes the circuit; everyone may send again."""
    clock = Clock()
    b = breaker(clock)
    fail(b, 3)
    clock.advance(10)
    assert b.allow()
    b.record_success()
    assert b.state is CircuitState.CLOSED
    assert b.allow() and b.allow()
    # The next opening starts from the base cool-down again.
    fail(b, 3)
    assert b.retry_in() == 10


def test_failed_probe_reopens_with_growing_capped_cooldown() -> None:
    """Each failed probe doubles the cool-down, up to max_cooldown."""
    clock = Clock()
    b = breaker(clock)
    fail(b, 3)
    for expected in (20, 35, 35):
        clock.advance(b.retry_in())
        assert b.allow()
        b.record_failure()
        assert b.state is CircuitState.OPEN
        assert b.retry_in() == expected


def test_abandoned_probe_frees_the_slot() -> None:
    """A probe that was never sent (local limit) does not leave the circuit stuck half-open."""
    clock = Clock()
    b = breaker(clock)
    fail(b, 3)
    clock.advance(10)
    assert b.allow()
    b.abandon()
    assert b.allow()
    assert not b.allow()


def test_late_failure_while_open_changes_nothing() -> None:
    """A request sent before the circuit opened may fail afterwards; the cool-down is not extended."""
    clock = Clock()
    b = breaker(clock)
    fail(b, 3)
    clock.advance(5)
    b.record_failure()
    assert b.retry_in() == 5


def test_state_changes_are_logged_once() -> None:
    """Opening is one warning, half-open and closing one line each, never one per message."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock = Clock()
        b = breaker(clock)
        fail(b, 3)
        for _ in range(5):
            assert not b.allow()
        clock.advance(10)
        assert b.allow()
        for _ in range(5):
            assert not b.allow()
        b.record_success()
        for _ in range(5):
            assert b.allow()
            b.record_success()
    finally:
        globalLogPublisher.removeObserver(events.append)
    mine = [e for e in events if e.get("provider") == "main"]
    assert [(e["state"], e["log_level"]) for e in mine] == [
        ("open", LogLevel.warn),
        ("half-open", LogLevel.info),
        ("closed", LogLevel.info),
    ]


@pytest.mark.parametrize(
    "kwargs",
    [{"failures": 0}, {"cooldown": 0}, {"cooldown": float("inf")}, {"cooldown": 10, "max_cooldown": 5}],
)
def test_policy_refuses_nonsense(kwargs: dict[str, Any]) -> None:
    """A policy that could never open or never close is refused."""
    with pytest.raises(ValueError):
        CircuitPolicy(**kwargs)
