"""Admission control shared by every listener: who may open a session, and who may try AUTH.

A mail server on the internet is probed from its first minute.  Per-session
limits (:mod:`mailgate.smtp`) bound what one connection can do; this module
bounds what one client, and all clients together, can do:

* **Load shedding**: beyond ``max_sessions`` concurrent sessions, or while
  ``max_deliveries_in_flight`` messages wait for their verdict, a new
  connection is answered ``421 4.7.0`` and closed at once, so an overloaded
  gateway refuses work at the door (the client retries later, RFC 5321
  §4.2.5) instead of failing transactions that are already under way.
* **Per-client connection limits**: at most ``max_connections_per_ip``
  concurrent sessions and ``max_connection_rate_per_ip`` new sessions per
  minute from one client (Postfix's ``smtpd_client_connection_count_limit``
  and ``smtpd_client_connection_rate_limit``).
* **AUTH failure throttling across connections**: after
  ``max_auth_failures_per_ip`` failed logins within ``auth_failure_window``
  seconds, AUTH from that client is refused (slowly, then ``421 4.7.0``)
  without checking the credentials, so reconnecting does not reset a password
  guesser's budget; clients elsewhere still log in.

A *client* is the peer address the session sees (``transport.getPeer()``,
which behind the PROXY protocol is the proxied address): an IPv4 address, or
an IPv6 address's /64 prefix, since one IPv6 host or site is normally given a
whole /64 (RFC 6177) and could otherwise rotate through 2**64 addresses.
``ipv6_client_prefix`` widens that (a /56 or /48 per site, RFC 6177 §2) for an
operator whose abusers rotate through the /64s of their site.
IPv4-mapped IPv6 addresses count as the IPv4 address.  Clients in
``exempt_networks`` (default: loopback, as Postfix exempts ``$mynetworks``) are
not subject to the per-client limits; load shedding applies to everyone.

Memory is bounded: concurrent-session counts exist only for clients with open
sessions (at most ``max_sessions``), and the rate and failure records are
token buckets kept in least-recently-used order, dropped once refilled and
capped at :data:`MAX_TRACKED_CLIENTS` (beyond that, the least recently seen
client is forgotten).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from mailgate import replies
from mailgate.config import LimitsConfig, Network
from mailgate.replies import Reply

MAX_TRACKED_CLIENTS = 65536  # Per bucket table; roughly 200 bytes each.
CONNECTION_RATE_WINDOW = 60.0  # max_connection_rate_per_ip is per minute.


def peer_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's IP address (IPv4-mapped IPv6 as IPv4); None for a non-IP peer."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def in_networks(host: str, networks: Iterable[Network]) -> bool:
    address = peer_address(host)
    return address is not None and any(address in network for network in networks)


def client_key(host: str, ipv6_prefix: int = 64) -> str:
    """The identity per-client limits count: IPv4 address, or IPv6 prefix
    (``ipv6_prefix`` bits, a /64 by default)."""
    address = peer_address(host)
    if address is None:
        return host  # A UNIX socket path or other non-IP peer: counted as itself.
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


class TokenBuckets:
    """``limit`` events per ``window`` seconds for each key, as token buckets.

    A bucket holds up to ``limit`` tokens and refills continuously at
    ``limit / window`` per second; an event takes one token.  A bucket that
    has refilled is the same as no bucket, so it is dropped: an entry not
    touched for ``window`` seconds is certainly full, and entries are kept in
    least-recently-touched order, so expired ones are always at the front.
    """

    def __init__(self, limit: int, window: float, clock: Any, max_keys: int = MAX_TRACKED_CLIENTS):
        self.limit = limit
        self.window = window
        self.rate = limit / window
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def reconfigure(self, limit: int, window: float) -> None:
        """New figures for every bucket (a reload).  What each key has spent
        stays spent: its tokens move by the change of the limit, within 0 and it."""
        change = float(limit - self.limit)
        for key, (tokens, stamp) in self._buckets.items():
            self._buckets[key] = (max(0.0, min(float(limit), tokens + change)), stamp)
        self.limit = limit
        self.window = window
        self.rate = limit / window

    def tokens(self, key: str) -> float:
        """Tokens left for ``key`` now (``limit`` when it has no record)."""
        now = self.clock.seconds()
        self._expire(now)
        entry = self._buckets.get(key)
        if entry is None:
            return float(self.limit)
        tokens, stamp = entry
        return min(float(self.limit), tokens + (now - stamp) * self.rate)

    def exhausted(self, key: str) -> bool:
        return self.tokens(key) < 1.0

    def take(self, key: str) -> bool:
        """Take a token for one event; False (and nothing taken) when none is left."""
        tokens = self.tokens(key)
        if tokens < 1.0:
            return False
        self._store(key, tokens - 1.0)
        return True

    def give(self, key: str) -> None:
        """Return a token taken by :meth:`take` for an event that did not count."""
        if key in self._buckets:
            self._store(key, min(float(self.limit), self.tokens(key) + 1.0))

    def _store(self, key: str, tokens: float) -> None:
        buckets = self._buckets
        buckets.pop(key, None)
        while len(buckets) >= self.max_keys:
            buckets.popitem(last=False)  # Forget the least recently seen client.
        buckets[key] = (tokens, self.clock.seconds())

    def _expire(self, now: float) -> None:
        buckets = self._buckets
        while buckets:
            key, (_, stamp) = next(iter(buckets.items()))
            if now - stamp < self.window:
                break
            del buckets[key]


class Admission:
    """The admission decisions of one gateway process, shared by its listeners."""

    def __init__(self, limits: LimitsConfig, clock: Any):
        self.limits = limits
        self.clock = clock
        self.sessions = 0
        self.deliveries = 0
        self._connections: dict[str, int] = {}
        self._connection_rate = TokenBuckets(
            limits.max_connection_rate_per_ip, CONNECTION_RATE_WINDOW, clock
        )
        self._auth_failures = TokenBuckets(
            limits.max_auth_failures_per_ip, limits.auth_failure_window, clock
        )

    def reconfigure(self, limits: LimitsConfig) -> None:
        """Apply reloaded ``[limits]`` to the decisions from now on; the counts so
        far stay.  Which client a connection counts for (``ipv6_client_prefix``,
        ``exempt_networks``) must not change while connections are open, or their
        closes would not match their opens: those two keep their values until a
        restart (the reload says so)."""
        self.limits = dataclasses.replace(
            limits,
            ipv6_client_prefix=self.limits.ipv6_client_prefix,
            exempt_networks=self.limits.exempt_networks,
        )
        self._connection_rate.reconfigure(limits.max_connection_rate_per_ip, CONNECTION_RATE_WINDOW)
        self._auth_failures.reconfigure(limits.max_auth_failures_per_ip, limits.auth_failure_window)

    def _key(self, host: str) -> str:
        return client_key(host, self.limits.ipv6_client_prefix)

    def _exempt(self, host: str) -> bool:
        return in_networks(host, self.limits.exempt_networks)

    # -- sessions -------------------------------------------------------------------

    def open_session(self, host: str) -> Reply | None:
        """Admit a new session from ``host`` (counted until :meth:`close_session`),
        or return the ``421`` reply it gets instead (and count nothing)."""
        limits = self.limits
        if self.sessions >= limits.max_sessions or self.deliveries >= limits.max_deliveries_in_flight:
            return replies.SERVER_BUSY
        key = self._key(host)
        if not self._exempt(host):
            if self._connections.get(key, 0) >= limits.max_connections_per_ip:
                return replies.TOO_MANY_CONNECTIONS
            if not self._connection_rate.take(key):
                return replies.CONNECTION_RATE_EXCEEDED
        self.sessions += 1
        self._connections[key] = self._connections.get(key, 0) + 1
        return None

    def close_session(self, host: str) -> None:
        key = self._key(host)
        self.sessions -= 1
        count = self._connections.get(key, 0) - 1
        if count > 0:
            self._connections[key] = count
        else:
            self._connections.pop(key, None)

    def connections_from(self, host: str) -> int:
        return self._connections.get(self._key(host), 0)

    # -- deliveries -------------------------------------------------------------------

    def delivery_started(self) -> None:
        self.deliveries += 1

    def delivery_finished(self) -> None:
        self.deliveries -= 1

    # -- AUTH -------------------------------------------------------------------------

    def auth_blocked(self, host: str) -> bool:
        """True once ``host`` has used up its failed-login budget for the window."""
        return not self._exempt(host) and self._auth_failures.exhausted(self._key(host))

    def auth_attempt(self, host: str) -> bool:
        """Charge one login attempt to ``host``'s failed-login budget *before* the
        credentials are checked; False (nothing charged) when the budget is spent.

        Charging up front is what makes the budget hold across parallel sessions:
        a guesser's concurrent connections, each past :meth:`auth_blocked` while
        the account store answers, would otherwise all get a guess.  An attempt
        that did not fail is handed back with :meth:`auth_not_failed`."""
        return self._exempt(host) or self._auth_failures.take(self._key(host))

    def auth_not_failed(self, host: str) -> None:
        """Give back the attempt charged by :meth:`auth_attempt` (login succeeded,
        or the account store could not answer)."""
        if not self._exempt(host):
            self._auth_failures.give(self._key(host))

    @property
    def tracked_clients(self) -> int:
        """How many client records are held (for memory-bound tests and metrics)."""
        return len(self._connections) + len(self._connection_rate) + len(self._auth_failures)
