"""What mailgate counts, for Prometheus: one registry per service, one recording object.

:class:`Metrics` owns a :class:`prometheus_client.CollectorRegistry` of its own
(never the process-global one), so two services in one process -- tests, or a
reload that builds new objects -- never share or collide over series.  The SMTP
session and the dispatcher record through the few methods below; the admin
listener (:mod:`mailgate.admin`) serves the registry as ``/metrics``.

Labels hold only bounded values that are not secret and not personal: listener
names (the role, never an address), ``tls`` true/false, SASL mechanism names,
SMTP reply codes, configured provider names and fixed outcome words.  Never an
account (passthrough account names derive from credentials, and an account
label would grow without bound), never a peer, never an email address.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from mailgate.outcome import Delivered, Failed, Outcome
from mailgate.replies import Reply

# Seconds; the API timeout defaults to 30 s, so the top buckets show requests near it.
PROVIDER_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
AUTH_RESULTS = ("success", "failure", "error")
# What one provider request came to (mailgate_provider_requests_total{outcome}).
PROVIDER_OUTCOMES = ("delivered", "rejected", "rate_limited", "unavailable", "unreachable", "no_answer")

QueueSnapshot = Callable[[], Mapping[str, Any]]


def provider_outcome(outcome: Outcome) -> str:
    """The ``outcome`` label of one provider request.

    ``rejected``: the API refused the message (permanent); ``rate_limited``: 429;
    ``unreachable``: nothing was sent (connection refused, DNS); ``no_answer``:
    the request may have arrived but no complete answer came back (timeout, reset);
    ``unavailable``: every other transient answer (5xx, 408, a redirect).
    """
    if isinstance(outcome, Delivered):
        return "delivered"
    if isinstance(outcome, Failed):
        return "rejected"
    if outcome.enhanced == "4.7.0":
        return "rate_limited"
    if outcome.ambiguous:
        return "no_answer"
    if outcome.enhanced == "4.4.1":
        return "unreachable"
    return "unavailable"


class QueueCollector:
    """``mailgate_queue_depth{state}`` and ``mailgate_queue_oldest_age_seconds``, read
    at scrape time from ``snapshot()``, which returns
    ``{"depth_by_state": {state: count}, "oldest_age": seconds or None}``."""

    def __init__(self, snapshot: QueueSnapshot):
        self.snapshot = snapshot

    def describe(self) -> Iterable[Any]:
        return [
            GaugeMetricFamily("mailgate_queue_depth", "Messages in the queue, by state", labels=["state"]),
            GaugeMetricFamily("mailgate_queue_oldest_age_seconds", "Age of the oldest queued message"),
        ]

    def collect(self) -> Iterator[Any]:
        snapshot = self.snapshot()
        depth = GaugeMetricFamily("mailgate_queue_depth", "Messages in the queue, by state", labels=["state"])
        for state, count in sorted(snapshot.get("depth_by_state", {}).items()):
            depth.add_metric([state], count)
        yield depth
        oldest = snapshot.get("oldest_age")
        # An empty queue has no oldest message: 0, so that alerts on age resolve.
        yield GaugeMetricFamily(
            "mailgate_queue_oldest_age_seconds", "Age of the oldest queued message", value=oldest or 0.0
        )


class Metrics:
    """The counters, gauges and histograms of one running gateway."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.connections = Counter(
            "mailgate_connections", "SMTP connections accepted", ["listener"], registry=registry
        )
        self.open_connections = Gauge(
            "mailgate_connections_open", "SMTP connections open now", ["listener"], registry=registry
        )
        self.sessions = Counter(
            "mailgate_sessions",
            "SMTP sessions ended, by listener and whether TLS was in use at the end",
            ["listener", "tls"],
            registry=registry,
        )
        self.auth = Counter(
            "mailgate_auth",
            "AUTH exchanges that reached the account store, by mechanism and result "
            "(success, failure: wrong credentials, error: store unavailable)",
            ["mechanism", "result"],
            registry=registry,
        )
        self.messages = Counter(
            "mailgate_messages",
            "Messages answered at the end of DATA, by result (accepted, rejected) and reply code",
            ["result", "code", "enhanced"],
            registry=registry,
        )
        self.provider_requests = Counter(
            "mailgate_provider_requests",
            "Requests sent to provider APIs, by provider and outcome",
            ["provider", "outcome"],
            registry=registry,
        )
        self.provider_latency = Histogram(
            "mailgate_provider_request_duration_seconds",
            "Time from sending a request to a provider to its complete answer (or failure)",
            ["provider"],
            buckets=PROVIDER_LATENCY_BUCKETS,
            registry=registry,
        )
        self.reloads = Counter(
            "mailgate_reloads", "Configuration reloads (SIGHUP), by result", ["result"], registry=registry
        )

    def declare(self, listeners: Iterable[str], providers: Iterable[str]) -> None:
        """Create the series of known listeners and providers at zero, so that
        dashboards and ``rate()`` see them before the first event."""
        for listener in listeners:
            self.connections.labels(listener)
            self.open_connections.labels(listener)
        for provider in providers:
            for outcome in PROVIDER_OUTCOMES:
                self.provider_requests.labels(provider, outcome)
            self.provider_latency.labels(provider)

    def watch_queue(self, snapshot: QueueSnapshot) -> None:
        """Serve the queue's depth and oldest age, read from ``snapshot`` at each scrape."""
        self.registry.register(QueueCollector(snapshot))  # type: ignore[arg-type]

    # -- recording (called by the SMTP session and the dispatcher) ---------------

    def connection_opened(self, listener: str) -> None:
        self.connections.labels(listener).inc()
        self.open_connections.labels(listener).inc()

    def session_ended(self, listener: str, tls: bool) -> None:
        self.open_connections.labels(listener).dec()
        self.sessions.labels(listener, "true" if tls else "false").inc()

    def auth_result(self, mechanism: str, result: str) -> None:
        """``result`` is one of :data:`AUTH_RESULTS`."""
        self.auth.labels(mechanism, result).inc()

    def message_answered(self, reply: Reply) -> None:
        result = "accepted" if reply.is_success else "rejected"
        self.messages.labels(result, str(reply.code), reply.enhanced).inc()

    def provider_request(self, provider: str, outcome: Outcome, seconds: float) -> None:
        self.provider_requests.labels(provider, provider_outcome(outcome)).inc()
        self.provider_latency.labels(provider).observe(seconds)
