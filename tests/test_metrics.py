"""What mailgate counts: the recording object, the SMTP session's and the
dispatcher's instrumentation, the queue collector, and label hygiene."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import REGISTRY, generate_latest
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from mailgate.accounts.account import Account
from mailgate.dispatch import Dispatcher
from mailgate.metrics import Metrics, provider_outcome
from mailgate.outcome import Delivered, Failed, Retry
from mailgate.providers.base import HTTPResponse
from mailgate.transports import APITimeout

from .smtp_helpers import BrokenStore, FakeDeliverer, authed_client, b64, connect, plain, tls_client
from .test_dispatch import EMAIL, ScriptedTransport, ok, route


def value(metrics: Metrics, name: str, **labels: str) -> float:
    sample = metrics.registry.get_sample_value(name, labels)
    return 0.0 if sample is None else sample


@pytest.mark.parametrize(
    ("outcome", "label"),
    [
        (Delivered("p", "id-1"), "delivered"),
        (Failed("p", "HTTP 422: bad"), "rejected"),
        (Retry("p", "rate limited by the API (HTTP 429)", "4.7.0"), "rate_limited"),
        (Retry("p", "no answer within 30 s", "4.4.1", ambiguous=True), "no_answer"),
        (Retry("p", "cannot reach the API (ConnectionRefusedError)", "4.4.1"), "unreachable"),
        (Retry("p", "API unavailable (HTTP 503)", "4.3.0"), "unavailable"),
        (Retry("p", "API answered with a redirect (HTTP 301)", "4.3.5"), "unavailable"),
    ],
)
def test_provider_outcome_labels(outcome: Any, label: str) -> None:
    """Every outcome maps to one of a fixed set of words, whatever the API said."""
    assert provider_outcome(outcome) == label


def test_each_metrics_object_has_its_own_registry() -> None:
    """Two services never share series, and nothing lands in the process-global registry."""
    first, second = Metrics(), Metrics()
    first.connection_opened("submission")
    assert value(first, "mailgate_connections_total", listener="submission") == 1
    assert value(second, "mailgate_connections_total", listener="submission") == 0
    assert REGISTRY.get_sample_value("mailgate_connections_total", {"listener": "submission"}) is None


def test_declared_series_start_at_zero() -> None:
    """Known listeners and providers appear in the exposition before the first event."""
    metrics = Metrics()
    metrics.declare(["relay", "submission"], ["main"])
    text = generate_latest(metrics.registry).decode()
    assert 'mailgate_connections_total{listener="relay"} 0.0' in text
    assert 'mailgate_provider_requests_total{outcome="no_answer",provider="main"} 0.0' in text
    assert 'mailgate_provider_request_duration_seconds_count{provider="main"} 0.0' in text


def test_queue_collector_reads_the_snapshot_at_each_scrape() -> None:
    """Depth by state and the oldest age come from the queue's snapshot when scraped."""
    metrics = Metrics()
    snapshot: dict[str, Any] = {"depth_by_state": {"ready": 3, "deferred": 2}, "oldest_age": 42.5}
    metrics.watch_queue(lambda: snapshot)
    assert value(metrics, "mailgate_queue_depth", state="ready") == 3
    assert value(metrics, "mailgate_queue_depth", state="deferred") == 2
    assert value(metrics, "mailgate_queue_oldest_age_seconds") == 42.5
    snapshot.update(depth_by_state={"ready": 0}, oldest_age=None)
    assert value(metrics, "mailgate_queue_depth", state="ready") == 0
    assert metrics.registry.get_sample_value("mailgate_queue_depth", {"state": "deferred"}) is None
    assert metrics.registry.get_sample_value("mailgate_queue_oldest_age_seconds") == 0.0


def test_no_queue_no_queue_series() -> None:
    """Without a queue (sync mode) no queue series is exposed, rather than a misleading zero."""
    assert b"mailgate_queue" not in generate_latest(Metrics().registry)


def test_session_counts_connection_auth_message_and_end() -> None:
    """A TLS session that logs in and sends one message shows up in every SMTP series."""
    client = authed_client(listener="submissions")
    metrics = client.session.metrics
    assert value(metrics, "mailgate_connections_total", listener="submissions") == 1
    assert value(metrics, "mailgate_connections_open", listener="submissions") == 1
    assert value(metrics, "mailgate_auth_total", mechanism="PLAIN", result="success") == 1
    assert client.message()[-1] == "250 2.0.0 Ok: prov-1"
    assert value(metrics, "mailgate_messages_total", result="accepted", code="250", enhanced="2.0.0") == 1
    client.cmd("QUIT")
    assert value(metrics, "mailgate_connections_open", listener="submissions") == 0
    assert value(metrics, "mailgate_sessions_total", listener="submissions", tls="true") == 1


def test_plaintext_session_is_counted_without_tls() -> None:
    """A session that never started TLS is counted with tls="false"."""
    client = connect("relay", listener="relay")
    client.ehlo()
    client.transport.loseConnection()
    metrics = client.session.metrics
    assert value(metrics, "mailgate_sessions_total", listener="relay", tls="false") == 1


def test_auth_failures_and_store_errors_by_mechanism(logged_errors: Any) -> None:
    """Wrong credentials count as failures, a broken store as errors, per mechanism."""
    client = tls_client(auth_failure_delay=0)
    client.ehlo()
    client.cmd(b"AUTH PLAIN " + plain("alice", "wrong"))
    client.clock.advance(0)
    client.cmd("AUTH LOGIN")
    client.cmd(b64("alice"))
    client.cmd(b64("wrong"))
    client.clock.advance(0)
    metrics = client.session.metrics
    assert value(metrics, "mailgate_auth_total", mechanism="PLAIN", result="failure") == 1
    assert value(metrics, "mailgate_auth_total", mechanism="LOGIN", result="failure") == 1

    broken = tls_client(store=BrokenStore({}))
    broken.ehlo()
    assert broken.code(b"AUTH PLAIN " + plain("alice", "s3cret")).startswith("454 4.7.0")
    assert value(broken.session.metrics, "mailgate_auth_total", mechanism="PLAIN", result="error") == 1
    assert len(logged_errors.take()) == 1


def test_rejected_messages_by_reply_code() -> None:
    """A message the API refuses and one that is too big are counted by their reply codes."""
    client = authed_client(deliverer=FakeDeliverer(Failed("api", "HTTP 422: no", 554, "5.6.0")))
    assert client.message()[-1].startswith("554 5.6.0")
    small = authed_client(max_message_size=100)
    assert small.message(b"Subject: x\r\n\r\n" + b"y" * 200 + b"\r\n")[-1].startswith("552 5.3.4")
    assert value(client.session.metrics, "mailgate_messages_total", result="rejected", code="554", enhanced="5.6.0") == 1
    assert value(small.session.metrics, "mailgate_messages_total", result="rejected", code="552", enhanced="5.3.4") == 1


def test_dispatcher_counts_each_request_and_its_latency() -> None:
    """Each provider request is counted by provider and outcome; its duration is observed."""
    clock = Clock()
    metrics = Metrics()

    class SlowTransport(ScriptedTransport):
        def send(self, request: Any) -> Any:
            clock.advance(0.3)
            return super().send(request)

    first = SlowTransport(error.ConnectionRefusedError())
    second = SlowTransport(HTTPResponse(503, (), b""), ok("id-9"))
    dispatcher = Dispatcher({"p1": route("p1", first), "p2": route("p2", second)}, ("p1", "p2"), clock, metrics=metrics)
    assert isinstance(dispatcher.deliver(EMAIL, Account(name="a"), "QID").result, Retry)
    assert dispatcher.deliver(EMAIL, Account(name="a", route=("p2",)), "QID2").result == Delivered("p2", "id-9")
    assert value(metrics, "mailgate_provider_requests_total", provider="p1", outcome="unreachable") == 1
    assert value(metrics, "mailgate_provider_requests_total", provider="p2", outcome="unavailable") == 1
    assert value(metrics, "mailgate_provider_requests_total", provider="p2", outcome="delivered") == 1
    assert value(metrics, "mailgate_provider_request_duration_seconds_count", provider="p2") == 2
    assert value(metrics, "mailgate_provider_request_duration_seconds_sum", provider="p2") == pytest.approx(0.6)
    assert value(metrics, "mailgate_provider_request_duration_seconds_bucket", provider="p2", le="0.5") == 2
    assert value(metrics, "mailgate_provider_request_duration_seconds_bucket", provider="p2", le="0.25") == 0


def test_timeout_is_no_answer() -> None:
    """A request that timed out is counted as no_answer."""
    metrics = Metrics()
    dispatcher = Dispatcher({"p1": route("p1", ScriptedTransport(APITimeout("no answer within 2 s")))}, ("p1",), Clock(), metrics=metrics)
    dispatcher.deliver(EMAIL, Account(name="a"), "QID")
    assert value(metrics, "mailgate_provider_requests_total", provider="p1", outcome="no_answer") == 1


def test_failover_is_logged_once_per_move() -> None:
    """A failover logs one line naming the provider left and why; the last failure is left
    to the message outcome line (no duplicate)."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        first = ScriptedTransport(HTTPResponse(503, (), b""))
        second = ScriptedTransport(HTTPResponse(502, (), b""))
        dispatcher = Dispatcher({"p1": route("p1", first), "p2": route("p2", second)}, ("p1", "p2"), Clock())
        dispatcher.deliver(EMAIL, Account(name="a"), "QID")
    finally:
        globalLogPublisher.removeObserver(events.append)
    failovers = [e for e in events if e.get("log_namespace", "").startswith("mailgate.dispatch")]
    assert [(e["provider"], e["previous"]) for e in failovers] == [("p2", "p1")]
    assert "HTTP 503" in failovers[0]["outcome"]
