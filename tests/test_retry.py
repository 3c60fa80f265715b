"""The retry schedule: exponential backoff with jitter, capped, Retry-After honoured,
given up after the queue lifetime."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.retry import RetryPolicy, next_attempt

POLICY = RetryPolicy()  # 60 s first, 1 h cap, 5 days, factor 2, jitter 20 %
MIDDLE = 0.5  # random() value that gives no jitter


@pytest.mark.parametrize(
    ("attempts", "delay"),
    [(1, 60), (2, 120), (3, 240), (4, 480), (5, 960), (6, 1920), (7, 3600), (8, 3600), (500, 3600)],
)
def test_backoff_doubles_up_to_the_cap(attempts: int, delay: float) -> None:
    """Without jitter the delay is 1, 2, 4 ... minutes, never more than an hour."""
    assert next_attempt(POLICY, arrival=0, now=1000, attempts=attempts, random=MIDDLE) == 1000 + delay


def test_jitter_moves_the_delay_both_ways_within_its_fraction() -> None:
    """random 0 shortens the first delay by 20 %, random near 1 lengthens it by 20 %."""
    assert next_attempt(POLICY, arrival=0, now=0, attempts=1, random=0.0) == pytest.approx(48)
    assert next_attempt(POLICY, arrival=0, now=0, attempts=1, random=0.999999) == pytest.approx(72, abs=0.01)


def test_retry_after_is_never_undercut() -> None:
    """A 429 with Retry-After: 600 waits 600 s even where backoff would say 60 s."""
    assert next_attempt(POLICY, arrival=0, now=0, attempts=1, random=MIDDLE, retry_after=600) == 600


def test_retry_after_beyond_the_cap_is_honoured() -> None:
    """An API asking for two hours gets two hours, above the one-hour cap."""
    assert next_attempt(POLICY, arrival=0, now=0, attempts=9, random=MIDDLE, retry_after=7200) == 7200


def test_shorter_retry_after_does_not_shorten_backoff() -> None:
    """Retry-After is a minimum: the backoff still applies when it is longer."""
    assert next_attempt(POLICY, arrival=0, now=0, attempts=3, random=MIDDLE, retry_after=5) == 240


def test_last_attempt_is_at_the_end_of_the_lifetime() -> None:
    """Near the end of the lifetime the next attempt is moved to the deadline, not beyond."""
    lifetime = POLICY.lifetime
    assert next_attempt(POLICY, arrival=0, now=lifetime - 100, attempts=50, random=MIDDLE) == lifetime


def test_gives_up_once_the_lifetime_is_over() -> None:
    """A failure at or after arrival + lifetime ends the retries."""
    assert next_attempt(POLICY, arrival=100, now=100 + POLICY.lifetime, attempts=120, random=MIDDLE) is None


def test_retry_after_past_the_lifetime_still_gets_the_last_attempt() -> None:
    """A Retry-After reaching past the lifetime does not bounce the message at once:
    the last attempt is at the end of the lifetime, and after it the message is given up."""
    assert next_attempt(POLICY, arrival=0, now=60, attempts=1, random=MIDDLE, retry_after=30 * 86400) == POLICY.lifetime
    assert next_attempt(POLICY, arrival=0, now=POLICY.lifetime - 10, attempts=3, random=MIDDLE, retry_after=60) == (
        POLICY.lifetime
    )
    assert next_attempt(POLICY, arrival=0, now=POLICY.lifetime, attempts=4, random=MIDDLE, retry_after=60) is None


@pytest.mark.parametrize(
    "kwargs",
    [{"first_retry": 0}, {"max_retry_interval": -1}, {"lifetime": float("inf")}, {"factor": 0.5}, {"jitter": 1.0}],
)
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    """Zero, negative or infinite durations and impossible factors are errors."""
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


@given(
    attempts=st.integers(min_value=1, max_value=10_000),
    random=st.floats(min_value=0, max_value=1, exclude_max=True),
    now=st.floats(min_value=0, max_value=10 * 86400),
    retry_after=st.none() | st.floats(min_value=0, max_value=10 * 86400),
)
def test_schedule_invariants(attempts: int, random: float, now: float, retry_after: float | None) -> None:
    """Whatever the history: the next attempt is in the future, within the lifetime,
    within the jittered cap (unless Retry-After asks for more), and not before
    Retry-After unless that reaches past the lifetime (then: the last attempt at its end)."""
    when = next_attempt(POLICY, arrival=0, now=now, attempts=attempts, random=random, retry_after=retry_after)
    if when is None:
        assert now >= POLICY.lifetime
        return
    assert now < when <= POLICY.lifetime
    if retry_after:
        assert when >= min(now + retry_after, POLICY.lifetime)
    else:
        assert when - now <= POLICY.max_retry_interval * (1 + POLICY.jitter)
