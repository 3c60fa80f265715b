"""Token bucket arithmetic, the per-provider request gate and the per-account message rate, on a Clock."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from mailgate.accounts.account import Account
from mailgate.ratelimit import (
    AccountRateLimiter,
    LimitWaitExceeded,
    MessageRate,
    RequestGate,
    RequestLimits,
    TokenBucket,
)

# -- TokenBucket -----------------------------------------------------------------


def test_bucket_starts_full_and_refills_at_the_rate() -> None:
    """A fresh bucket allows a burst, then one token per 1/rate seconds."""
    bucket = TokenBucket(rate=2, burst=3, now=0)
    assert [bucket.take(0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_time(0) == pytest.approx(0.5)
    assert not bucket.take(0.4)
    assert bucket.take(0.5)
    assert bucket.is_full(100)
    assert bucket.tokens == 3  # never more than the burst


@given(
    rate=st.floats(min_value=0.01, max_value=1000),
    burst=st.integers(min_value=1, max_value=100),
    steps=st.lists(st.floats(min_value=0, max_value=10), max_size=200),
)
def test_bucket_never_exceeds_rate_plus_burst(rate: float, burst: int, steps: list[float]) -> None:
    """Over any span of time, no more than burst + rate x elapsed tokens are handed out."""
    bucket = TokenBucket(rate, burst, now=0)
    now, taken = 0.0, 0
    for step in steps:
        now += step
        while bucket.take(now):
            taken += 1
        assert taken <= burst + rate * now + 1e-6


def test_bucket_reconfigure_keeps_what_was_used() -> None:
    """Lowering the burst caps the saved tokens; a used-up bucket stays used up."""
    bucket = TokenBucket(rate=1, burst=10, now=0)
    bucket.reconfigure(1, 4, 0)
    assert bucket.tokens == 4
    for _ in range(4):
        assert bucket.take(0)
    bucket.reconfigure(1, 10, 0)
    assert not bucket.take(0)


def test_bucket_refuses_nonsense() -> None:
    """Zero, negative or infinite rates and bursts below one are refused."""
    for rate, burst in ((0, 1), (-1, 1), (float("inf"), 1), (1, 0.5)):
        with pytest.raises(ValueError):
            TokenBucket(rate, burst, 0)


# -- RequestGate -------------------------------------------------------------------


def test_gate_limits_concurrency_in_arrival_order() -> None:
    """With max_concurrency=2 the third request waits until one of the first two is released."""
    gate = RequestGate(RequestLimits(max_concurrency=2), Clock())
    first, second, third = gate.acquire(None), gate.acquire(None), gate.acquire(None)
    assert first.called and second.called and not third.called
    assert gate.in_flight == 2
    release = first.result
    release()
    release()  # a second release is harmless
    assert third.called
    assert gate.in_flight == 2


def test_gate_spaces_requests_at_the_rate() -> None:
    """rate=2/s, burst=1: requests start 0.5 s apart, in the order they asked."""
    clock = Clock()
    gate = RequestGate(RequestLimits(max_concurrency=10, rate=2, burst=1), clock)
    started: list[tuple[int, float]] = []
    for index in range(4):
        d = gate.acquire(None)
        d.addCallback(lambda release, i=index: (started.append((i, clock.seconds())), release()))
    for _ in range(8):
        clock.advance(0.25)
    assert started == [(0, 0.0), (1, 0.5), (2, 1.0), (3, 1.5)]
    assert gate.in_flight == 0


def test_gate_wait_is_bounded() -> None:
    """A request that cannot get a slot within its timeout fails with LimitWaitExceeded,
    and leaves no slot or rate token behind."""
    clock = Clock()
    gate = RequestGate(RequestLimits(max_concurrency=1), clock)
    holder = gate.acquire(5)
    waiting = gate.acquire(5)
    clock.advance(4.9)
    assert not waiting.called
    clock.advance(0.1)
    failure = waiting.result
    waiting.addErrback(lambda _: None)
    assert failure.check(LimitWaitExceeded)
    assert "within 5 s" in str(failure.value)
    holder.result()
    assert gate.in_flight == 0
    assert gate.acquire(5).called
    assert clock.getDelayedCalls() == []


def test_gate_rate_wait_is_bounded_and_releases_the_slot() -> None:
    """Timing out while waiting for a rate token gives the concurrency slot back."""
    clock = Clock()
    gate = RequestGate(RequestLimits(max_concurrency=1, rate=0.1, burst=1), clock)
    gate.acquire(1).result()
    late = gate.acquire(1)
    clock.advance(1)
    assert late.result.check(LimitWaitExceeded)
    late.addErrback(lambda _: None)
    assert gate.in_flight == 0
    assert clock.getDelayedCalls() == []
    clock.advance(9)
    assert gate.acquire(1).called


def test_default_burst_is_one_second_of_rate() -> None:
    """Without burst the bucket holds one second's worth of requests (at least one)."""
    assert RequestLimits(rate=20).bucket_size == 20
    assert RequestLimits(rate=0.5).bucket_size == 1
    assert RequestLimits(rate=0.5, burst=7).bucket_size == 7


# -- AccountRateLimiter ------------------------------------------------------------


def test_account_rate_and_burst() -> None:
    """An account with 6 messages a minute may send 6 at once, then one every 10 s."""
    clock = Clock()
    limiter = AccountRateLimiter(clock)
    account = Account(name="a", max_messages_per_minute=6)
    assert [limiter.allow(account) for _ in range(7)] == [True] * 6 + [False]
    clock.advance(9.9)
    assert not limiter.allow(account)
    clock.advance(0.1)
    assert limiter.allow(account)


def test_accounts_are_limited_separately() -> None:
    """One busy account does not use up another's allowance."""
    limiter = AccountRateLimiter(Clock(), MessageRate(per_minute=1, burst=1))
    assert limiter.allow(Account(name="a"))
    assert not limiter.allow(Account(name="a"))
    assert limiter.allow(Account(name="b"))


@pytest.mark.parametrize(
    "account, default, expected",
    [
        (Account(name="a"), None, None),
        (Account(name="a"), MessageRate(60, 10), MessageRate(60, 10)),
        (Account(name="a", max_messages_per_minute=0), MessageRate(60, 10), None),
        (Account(name="a", max_messages_per_minute=30), MessageRate(60, 10), MessageRate(30, 30)),
        (Account(name="a", max_messages_per_minute=30, message_burst=5), None, MessageRate(30, 5)),
        (Account(name="a", message_burst=3), MessageRate(60, 10), MessageRate(60, 3)),
    ],
)
def test_account_setting_wins_over_the_default(
    account: Account, default: MessageRate | None, expected: MessageRate | None
) -> None:
    """The account's own figures win; 0 means unlimited; otherwise the server default applies."""
    assert AccountRateLimiter(Clock(), default).rate_for(account) == expected


def test_unlimited_accounts_take_no_memory() -> None:
    """Accounts without a limit are never tracked."""
    limiter = AccountRateLimiter(Clock())
    for index in range(100):
        assert limiter.allow(Account(name=f"a{index}"))
    assert len(limiter) == 0


def test_idle_buckets_are_forgotten() -> None:
    """Once an account's bucket is full again (idle), it is dropped: memory follows the
    active accounts, not every name ever seen."""
    clock = Clock()
    limiter = AccountRateLimiter(clock, MessageRate(per_minute=60, burst=60))
    for index in range(1000):
        limiter.allow(Account(name=f"passthrough-{index:012x}"))
    assert len(limiter) == 1000
    clock.advance(61)
    limiter.allow(Account(name="fresh"))
    assert len(limiter) == 1


def test_tracked_accounts_are_capped() -> None:
    """However many accounts are busy at once, at most max_tracked buckets are kept."""
    limiter = AccountRateLimiter(Clock(), MessageRate(per_minute=1, burst=1), max_tracked=10)
    for index in range(50):
        limiter.allow(Account(name=f"a{index}"))
    assert len(limiter) == 10


def test_changed_limits_apply_to_an_existing_bucket() -> None:
    """After an accounts reload with a lower limit, the new limit applies at once."""
    limiter = AccountRateLimiter(Clock())
    assert limiter.allow(Account(name="a", max_messages_per_minute=100))
    lowered = Account(name="a", max_messages_per_minute=2)
    results: list[Any] = [limiter.allow(lowered) for _ in range(3)]
    assert results == [True, True, False]
