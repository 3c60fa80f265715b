"""mailgate.admission: per-client keys, token buckets, session and AUTH-failure accounting."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from twisted.internet.task import Clock

from mailgate import replies
from mailgate.admission import CONNECTION_RATE_WINDOW, Admission, TokenBuckets, client_key, in_networks
from mailgate.config import LimitsConfig


def admission(**limits: object) -> tuple[Admission, Clock]:
    clock = Clock()
    config = dataclasses.replace(LimitsConfig(exempt_networks=()), **limits)
    return Admission(config, clock), clock


@pytest.mark.parametrize(
    "host, key",
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("/run/mailgate.sock", "/run/mailgate.sock"),
    ],
)
def test_client_key(host: str, key: str) -> None:
    """IPv4 by address (IPv4-mapped too), IPv6 by /64 prefix, anything else as itself."""
    assert client_key(host) == key


def test_client_key_with_a_wider_ipv6_prefix() -> None:
    """ipv6_client_prefix counts a whole IPv6 site (/48 here) as one client; IPv4 is unaffected."""
    assert client_key("2001:db8:1:2:aaaa::1", 48) == "2001:db8:1::/48"
    assert client_key("2001:db8:1:ffff::1", 48) == "2001:db8:1::/48"
    assert client_key("192.0.2.7", 48) == "192.0.2.7"


def test_a_site_rotating_through_its_64s_is_one_client_with_a_48_prefix() -> None:
    """With the default /64, two /64s of one site each get max_connections_per_ip;
    with ipv6_client_prefix = 48 they share it, and another site does not."""
    default, _ = admission(max_connections_per_ip=1)
    assert default.open_session("2001:db8:1:1::1") is None
    assert default.open_session("2001:db8:1:2::1") is None
    site, _ = admission(max_connections_per_ip=1, ipv6_client_prefix=48)
    assert site.open_session("2001:db8:1:1::1") is None
    assert site.open_session("2001:db8:1:2::1") == replies.TOO_MANY_CONNECTIONS
    assert site.open_session("2001:db8:2:1::1") is None
    site.close_session("2001:db8:1:1::1")
    assert site.open_session("2001:db8:1:2::1") is None


def test_in_networks_unmaps_ipv4() -> None:
    """An IPv4-mapped IPv6 peer matches IPv4 networks; non-IP peers match nothing."""
    loopback = [ipaddress.ip_network("127.0.0.0/8")]
    assert in_networks("::ffff:127.0.0.1", loopback)
    assert not in_networks("10.0.0.1", loopback)
    assert not in_networks("unix-socket", loopback)


def test_token_bucket_limit_and_refill() -> None:
    """limit events at once, then one more per window/limit seconds."""
    clock = Clock()
    buckets = TokenBuckets(3, 60.0, clock)
    assert [buckets.take("a") for _ in range(4)] == [True, True, True, False]
    assert buckets.take("b")  # Keys are independent.
    clock.advance(19.9)
    assert not buckets.take("a")
    clock.advance(0.2)
    assert buckets.take("a") and not buckets.take("a")


def test_token_buckets_forget_refilled_clients() -> None:
    """A bucket untouched for a whole window is full again, and is dropped."""
    clock = Clock()
    buckets = TokenBuckets(5, 10.0, clock)
    for index in range(100):
        buckets.take(f"10.0.0.{index}")
    assert len(buckets) == 100
    clock.advance(10.0)
    buckets.take("10.0.1.1")
    assert len(buckets) == 1


def test_token_buckets_memory_is_capped() -> None:
    """Beyond max_keys distinct clients inside one window, the least recently seen is forgotten."""
    clock = Clock()
    buckets = TokenBuckets(1, 3600.0, clock, max_keys=1000)
    for index in range(5000):
        buckets.take(f"client-{index}")
        clock.advance(0.001)
    assert len(buckets) == 1000
    assert buckets.exhausted("client-4999")  # The recent ones are remembered...
    assert not buckets.exhausted("client-0")  # ...the oldest were forgotten.


def test_concurrent_sessions_per_client() -> None:
    """max_connections_per_ip concurrent sessions per client; closing one frees a slot."""
    gate, _ = admission(max_connections_per_ip=2)
    assert gate.open_session("192.0.2.1") is None
    assert gate.open_session("192.0.2.1") is None
    assert gate.open_session("192.0.2.1") == replies.TOO_MANY_CONNECTIONS
    assert gate.open_session("192.0.2.2") is None
    gate.close_session("192.0.2.1")
    assert gate.open_session("192.0.2.1") is None
    assert gate.sessions == 3 and gate.connections_from("192.0.2.1") == 2


def test_ipv6_clients_share_their_64() -> None:
    """Addresses in one /64 count together; the next /64 is another client."""
    gate, _ = admission(max_connections_per_ip=2)
    assert gate.open_session("2001:db8::1") is None
    assert gate.open_session("2001:db8::ffff:2") is None
    assert gate.open_session("2001:db8::3") == replies.TOO_MANY_CONNECTIONS
    assert gate.open_session("2001:db8:0:1::1") is None


def test_connection_rate_per_client() -> None:
    """max_connection_rate_per_ip new sessions per minute; refused ones are not counted as sessions."""
    gate, clock = admission(max_connection_rate_per_ip=3)
    for _ in range(3):
        assert gate.open_session("192.0.2.1") is None
        gate.close_session("192.0.2.1")
    assert gate.open_session("192.0.2.1") == replies.CONNECTION_RATE_EXCEEDED
    assert gate.sessions == 0
    clock.advance(CONNECTION_RATE_WINDOW / 3)
    assert gate.open_session("192.0.2.1") is None


def test_reconfigure_applies_new_limits_and_keeps_what_was_counted() -> None:
    """A reload changes the limits for the decisions that follow; open sessions and
    spent tokens stay counted; which client a connection counts for (the IPv6
    prefix, the exempt networks) keeps its value, so closes still match opens."""
    gate, clock = admission(max_connections_per_ip=1, max_connection_rate_per_ip=10, max_auth_failures_per_ip=5)
    assert gate.open_session("2001:db8::1") is None
    for _ in range(3):
        gate.auth_attempt("192.0.2.1")
    reloaded = LimitsConfig(
        max_connections_per_ip=2,
        max_connection_rate_per_ip=10,
        max_auth_failures_per_ip=3,
        ipv6_client_prefix=48,
        exempt_networks=(ipaddress.ip_network("2001:db8::/32"),),
    )
    gate.reconfigure(reloaded)
    assert gate.limits.max_connections_per_ip == 2
    assert (gate.limits.ipv6_client_prefix, gate.limits.exempt_networks) == (64, ())
    assert gate.open_session("2001:db8::2") is None  # the same /64: two allowed now
    assert gate.open_session("2001:db8::3") == replies.TOO_MANY_CONNECTIONS
    assert gate.auth_blocked("192.0.2.1")  # three failures were spent; three is the limit now
    gate.close_session("2001:db8::1")
    gate.close_session("2001:db8::2")
    assert gate.sessions == 0 and gate.connections_from("2001:db8::1") == 0


def test_load_shedding() -> None:
    """Past max_sessions, or with max_deliveries_in_flight waiting, everyone gets 421 at connect."""
    gate, _ = admission(max_sessions=2, max_deliveries_in_flight=1)
    assert gate.open_session("192.0.2.1") is None
    assert gate.open_session("192.0.2.2") is None
    assert gate.open_session("192.0.2.3") == replies.SERVER_BUSY
    gate.close_session("192.0.2.2")
    gate.delivery_started()
    assert gate.open_session("192.0.2.3") == replies.SERVER_BUSY
    gate.delivery_finished()
    assert gate.open_session("192.0.2.3") is None


def test_exempt_networks_skip_per_client_limits_only() -> None:
    """Exempt clients have no per-client limits, but load shedding still applies to them."""
    gate, _ = admission(
        max_connections_per_ip=1,
        max_connection_rate_per_ip=1,
        max_auth_failures_per_ip=1,
        max_sessions=3,
        exempt_networks=(ipaddress.ip_network("127.0.0.0/8"),),
    )
    assert [gate.open_session("127.0.0.1") for _ in range(3)] == [None, None, None]
    assert gate.open_session("127.0.0.1") == replies.SERVER_BUSY
    gate.auth_attempt("127.0.0.1")
    gate.auth_attempt("127.0.0.1")
    assert not gate.auth_blocked("127.0.0.1")


def test_auth_failures_across_sessions() -> None:
    """After max_auth_failures_per_ip failures a client is blocked; others are not; the
    block lifts as the window refills."""
    gate, clock = admission(max_auth_failures_per_ip=3, auth_failure_window=300.0)
    for _ in range(3):
        assert not gate.auth_blocked("192.0.2.1")
        gate.auth_attempt("192.0.2.1")
    assert gate.auth_blocked("192.0.2.1")
    assert not gate.auth_blocked("192.0.2.2")
    clock.advance(100.0)
    assert not gate.auth_blocked("192.0.2.1")
    gate.auth_attempt("192.0.2.1")
    assert gate.auth_blocked("192.0.2.1")


def test_state_is_released() -> None:
    """Session counts leave nothing behind; refilled buckets are dropped: memory returns to zero."""
    gate, clock = admission()
    for index in range(50):
        host = f"192.0.2.{index}"
        assert gate.open_session(host) is None
        gate.auth_attempt(host)
        gate.close_session(host)
    assert gate.tracked_clients == 100
    clock.advance(max(CONNECTION_RATE_WINDOW, gate.limits.auth_failure_window))
    gate.open_session("198.51.100.1")
    gate.auth_blocked("198.51.100.1")
    assert gate.tracked_clients == 2


def test_auth_attempts_are_charged_up_front_and_successes_given_back() -> None:
    """The budget is spent as attempts start (so parallel sessions share it); an attempt
    that did not fail is handed back, so logging in costs nothing."""
    gate, _ = admission(max_auth_failures_per_ip=2)
    assert gate.auth_attempt("192.0.2.1") and gate.auth_attempt("192.0.2.1")
    assert not gate.auth_attempt("192.0.2.1") and gate.auth_blocked("192.0.2.1")
    gate.auth_not_failed("192.0.2.1")
    assert not gate.auth_blocked("192.0.2.1")
    gate.auth_not_failed("192.0.2.1")
    gate.auth_not_failed("192.0.2.1")  # Never more than the full budget.
    assert [gate.auth_attempt("192.0.2.1") for _ in range(3)] == [True, True, False]
