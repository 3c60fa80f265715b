"""The dispatcher and transports: failover along the route, timeouts on a Clock,
the treq transport against a stub API, the capture folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailgate.accounts.account import Account
from mailgate.circuit import CircuitPolicy, CircuitState
from mailgate.dispatch import Dispatcher, Route, request_key
from mailgate.interfaces import IDeliverer, ITransport
from mailgate.message import parse_message
from mailgate.outcome import Delivered, Failed, Retry
from mailgate.providers.base import HTTPResponse
from mailgate.providers.webhook import WebhookProvider
from mailgate.ratelimit import RequestLimits
from mailgate.transports import APITimeout, CaptureTransport, TreqTransport

RAW = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
EMAIL = parse_message(RAW, "a@example.com", ("b@example.org",))


@implementer(ITransport)
class ScriptedTransport:
    """Answers each request with the next scripted response or exception."""

    def __init__(self, *answers: Any):
        self.answers = list(answers)
        self.sent: list[Any] = []

    def send(self, request: Any) -> defer.Deferred[HTTPResponse]:
        self.sent.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)


def ok(identifier: str) -> HTTPResponse:
    return HTTPResponse(200, (), json.dumps({"id": identifier}).encode())


def route(name: str, transport: ScriptedTransport) -> Route:
    return Route(WebhookProvider(name, {"url": f"https://{name}.example/v1"}), transport)


def deliver(dispatcher: Dispatcher, account: Account = Account(name="a")) -> Any:
    return dispatcher.deliver(EMAIL, account, "QID").result


def test_dispatcher_provides_interface() -> None:
    """The dispatcher is an IDeliverer; the transports are ITransports."""
    dispatcher = Dispatcher({}, (), Clock())
    assert verifyObject(IDeliverer, dispatcher)
    assert verifyObject(ITransport, CaptureTransport(Path("/nonexistent")))
    assert verifyObject(ITransport, TreqTransport(object(), Clock(), 1))


def test_first_provider_delivers() -> None:
    """When the first provider accepts, the second is never asked."""
    first, second = ScriptedTransport(ok("one")), ScriptedTransport(ok("two"))
    dispatcher = Dispatcher({"p1": route("p1", first), "p2": route("p2", second)}, ("p1", "p2"), Clock())
    assert deliver(dispatcher) == Delivered("p1", "one")
    assert second.sent == []


def test_transient_failure_fails_over() -> None:
    """A 503 or a connection error moves the message to the next provider on the route."""
    first = ScriptedTransport(HTTPResponse(503, (), b""))
    second = ScriptedTransport(error.ConnectionRefusedError())
    third = ScriptedTransport(ok("three"))
    providers = {"p1": route("p1", first), "p2": route("p2", second), "p3": route("p3", third)}
    dispatcher = Dispatcher(providers, ("p1", "p2", "p3"), Clock())
    assert deliver(dispatcher) == Delivered("p3", "three")


def test_permanent_rejection_stops_the_route() -> None:
    """A content rejection is final: it is not retried elsewhere (the next API would only repeat it)."""
    first, second = ScriptedTransport(HTTPResponse(400, (), b'{"message": "no"}')), ScriptedTransport(ok("x"))
    dispatcher = Dispatcher({"p1": route("p1", first), "p2": route("p2", second)}, ("p1", "p2"), Clock())
    assert deliver(dispatcher) == Failed("p1", "HTTP 400: no", 554, "5.6.0")
    assert second.sent == []


def test_all_transient_gives_the_last_retry() -> None:
    """When every provider fails transiently the client is told to retry (451)."""
    dispatcher = Dispatcher(
        {"p1": route("p1", ScriptedTransport(HTTPResponse(500, (), b""))), "p2": route("p2", ScriptedTransport(APITimeout("no answer within 30 s")))},
        ("p1", "p2"),
        Clock(),
    )
    outcome = deliver(dispatcher)
    assert outcome == Retry("p2", "no answer within 30 s", "4.4.1", ambiguous=True)
    assert outcome.reply().code == 451


def test_ambiguous_failure_does_not_fail_over() -> None:
    """A timeout or a reset after sending may mean the API took the message: trying the
    next provider could deliver it twice, so the client is told to retry instead."""
    second = ScriptedTransport(ok("two"))
    for failure in (APITimeout("no answer within 30 s"), error.ConnectionLost()):
        dispatcher = Dispatcher(
            {"p1": route("p1", ScriptedTransport(failure)), "p2": route("p2", second)}, ("p1", "p2"), Clock()
        )
        outcome = deliver(dispatcher)
        assert (outcome.provider, outcome.ambiguous, outcome.reply().code) == ("p1", True, 451)
    assert second.sent == []


def test_account_route_overrides_default(logged_errors: Any) -> None:
    """An account's own route is used instead of the server's; an unknown name is a logged,
    transient error (451 4.3.5), so a misconfiguration never bounces mail."""
    used = ScriptedTransport(ok("b"))
    dispatcher = Dispatcher({"p1": route("p1", ScriptedTransport()), "p2": route("p2", used)}, ("p1",), Clock())
    assert deliver(dispatcher, Account(name="x", route=("p2",))) == Delivered("p2", "b")
    missing = deliver(dispatcher, Account(name="y", route=("gone",)))
    assert (missing.reply().code, missing.enhanced) == (451, "4.3.5")
    [event] = logged_errors.take()
    assert event["name"] == "gone"


class Hanging(Resource):
    isLeaf = True

    def render(self, request: Any) -> Any:
        return NOT_DONE_YET


class Answering(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes | None, bytes]] = []

    def render(self, request: Any) -> bytes:
        self.seen.append((request.method, request.getHeader(b"authorization"), request.content.read()))
        request.setResponseCode(202)
        request.setHeader(b"Retry-After", b"5")
        return b'{"id": "stub-1"}'


def test_treq_transport_sends_and_reads() -> None:
    """The treq transport sends method, headers and body, and returns status, headers and body."""
    resource = Answering()
    stub = StubTreq(resource)
    transport = TreqTransport(stub, Clock(), 30)
    [request] = WebhookProvider("p", {"url": "https://api.example/v1", "token": "tk"}).build_requests(
        EMAIL, Account(name="a"), "Q"
    )
    result = transport.send(request)
    stub.flush()
    response = result.result
    assert response.status == 202
    assert response.header("retry-after") == "5"
    assert response.json() == {"id": "stub-1"}
    assert resource.seen == [(b"POST", b"Bearer tk", request.body)]


def test_treq_transport_sends_provider_urls_in_uri_form() -> None:
    """A provider URL with an internationalised host and a non-ASCII path reaches
    the HTTP agent as its URI (IDNA host, percent-encoded path), on every request:
    the transport converts it once and reuses it."""
    from treq.client import HTTPClient
    from twisted.web.iweb import IAgent

    @implementer(IAgent)
    class Recording:
        def __init__(self) -> None:
            self.uris: list[bytes] = []

        def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Any:
            self.uris.append(uri)
            return defer.Deferred()

    agent = Recording()
    transport = TreqTransport(HTTPClient(agent), Clock(), 30)
    provider = WebhookProvider("p", {"url": "https://bücher.example:8443/hooks/é mail?x=1"})
    for queue_id in ("Q1", "Q2"):
        [request] = provider.build_requests(EMAIL, Account(name="a"), queue_id)
        transport.send(request)
    assert agent.uris == [b"https://xn--bcher-kva.example:8443/hooks/%C3%A9%20mail?x=1"] * 2


def test_treq_transport_times_out_on_the_clock() -> None:
    """An API that never answers fails with APITimeout exactly when the clock passes the timeout."""
    clock = Clock()
    stub = StubTreq(Hanging())
    transport = TreqTransport(stub, clock, 30)
    [request] = WebhookProvider("p", {"url": "https://api.example/v1"}).build_requests(EMAIL, Account(name="a"), "Q")
    result = transport.send(request)
    stub.flush()
    clock.advance(29.9)
    assert not result.called
    clock.advance(0.2)
    failure = result.result
    result.addErrback(lambda _: None)
    assert failure.check(APITimeout)
    assert str(failure.value) == "no answer within 30 s"


def test_capture_writes_redacted_request(tmp_path: Path) -> None:
    """The capture transport writes the request as JSON, credentials redacted, and answers 200."""
    transport = CaptureTransport(tmp_path / "captured")
    [request] = WebhookProvider("cap", {"url": "https://api.example/v1", "token": "secret-token"}).build_requests(
        EMAIL, Account(name="a"), "QID9"
    )
    response = transport.send(request).result
    assert response.status == 200 and response.json()["id"] == "QID9"
    written = (tmp_path / "captured" / "QID9.json").read_text()
    assert "secret-token" not in written
    document = json.loads(written)
    assert ["Authorization", "<redacted>"] in document["headers"]
    assert document["body"]["subject"] == "hi"
    assert document["url"] == "https://api.example/v1"
    assert list((tmp_path / "captured").iterdir()) == [tmp_path / "captured" / "QID9.json"]


class Oversized(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setResponseCode(200)
        return b"x" * (2 * 1024 * 1024)


def test_accepted_with_unreadable_body_is_delivered() -> None:
    """An API that answers 2xx but whose body cannot be read (over 1 MiB) took the
    message: it counts as delivered under mailgate's id, never as a failure."""
    stub = StubTreq(Oversized())
    transport = TreqTransport(stub, Clock(), 30)
    provider = WebhookProvider("p", {"url": "https://api.example/v1"})
    [request] = provider.build_requests(EMAIL, Account(name="a"), "QID5")
    result = transport.send(request)
    stub.flush()
    response = result.result
    assert (response.status, response.body) == (200, b"")
    assert provider.classify(request, response) == Delivered("p", "QID5")


# -- circuit breakers and request limits ---------------------------------------------

FAST_OPEN = CircuitPolicy(failures=2, cooldown=60, max_cooldown=600)


DEFAULT_LIMITS = RequestLimits()


def breaker_route(name: str, transport: Any, limits: RequestLimits = DEFAULT_LIMITS) -> Route:
    return Route(WebhookProvider(name, {"url": f"https://{name}.example/v1"}), transport, limits, FAST_OPEN)


class Outage:
    """A transport whose API is down (503) until ``up`` is set; counts requests."""

    def __init__(self) -> None:
        self.up = False
        self.sent = 0

    def send(self, request: Any) -> defer.Deferred[HTTPResponse]:
        self.sent += 1
        return defer.succeed(ok(f"id-{self.sent}") if self.up else HTTPResponse(503, (), b""))


class Always:
    def __init__(self, name: str):
        self.name = name
        self.sent = 0

    def send(self, request: Any) -> defer.Deferred[HTTPResponse]:
        self.sent += 1
        return defer.succeed(ok(f"{self.name}-{self.sent}"))


def test_open_circuit_fails_over_then_probe_brings_the_provider_back() -> None:
    """After consecutive failures the first provider is skipped (no request at all) and mail
    goes to the second; after the cool-down one probe goes to the first, and when it
    succeeds the first provider takes the traffic again."""
    clock = Clock()
    primary, backup = Outage(), Always("backup")
    dispatcher = Dispatcher(
        {"p1": breaker_route("p1", primary), "p2": breaker_route("p2", backup)}, ("p1", "p2"), clock
    )
    assert deliver(dispatcher) == Delivered("p2", "backup-1")
    assert deliver(dispatcher) == Delivered("p2", "backup-2")
    assert primary.sent == 2  # the circuit is now open
    for index in range(3, 6):
        assert deliver(dispatcher) == Delivered("p2", f"backup-{index}")
    assert primary.sent == 2
    clock.advance(60)
    primary.up = True
    assert deliver(dispatcher) == Delivered("p1", "id-3")  # the probe
    assert deliver(dispatcher) == Delivered("p1", "id-4")
    assert backup.sent == 5


def test_failed_probe_keeps_failing_over() -> None:
    """A probe that fails re-opens the circuit: the message still fails over, and the
    first provider is left alone for a longer cool-down."""
    clock = Clock()
    primary, backup = Outage(), Always("backup")
    dispatcher = Dispatcher(
        {"p1": breaker_route("p1", primary), "p2": breaker_route("p2", backup)}, ("p1", "p2"), clock
    )
    deliver(dispatcher), deliver(dispatcher)
    clock.advance(60)
    assert deliver(dispatcher) == Delivered("p2", "backup-3")
    assert primary.sent == 3
    clock.advance(60)
    deliver(dispatcher)
    assert primary.sent == 3  # the cool-down doubled to 120 s
    assert dispatcher.breakers["p1"].retry_in() == 60


def test_all_circuits_open_is_451_without_a_request() -> None:
    """When every provider on the route is open, nothing is sent and the client gets
    451 4.3.0 naming the reason; ``after`` says when a probe will be allowed."""
    clock = Clock()
    first, second = Outage(), Outage()
    dispatcher = Dispatcher(
        {"p1": breaker_route("p1", first), "p2": breaker_route("p2", second)}, ("p1", "p2"), clock
    )
    for _ in range(2):
        assert deliver(dispatcher).reply().code == 451
    clock.advance(15)
    outcome = deliver(dispatcher)
    assert (first.sent, second.sent) == (2, 2)
    assert outcome == Retry("mailgate", "all routes down (circuit open for p1, p2)", "4.3.0", after=45)
    assert str(outcome.reply()) == (
        "451 4.3.0 Temporary failure at mailgate: all routes down (circuit open for p1, p2)"
    )


def test_ambiguous_failures_count_towards_the_circuit() -> None:
    """Timeouts open the circuit too (the API is not answering), though they never fail over."""
    clock = Clock()
    transport = ScriptedTransport(APITimeout("no answer within 30 s"), APITimeout("no answer within 30 s"))
    dispatcher = Dispatcher({"p1": breaker_route("p1", transport)}, ("p1",), clock)
    for _ in range(2):
        assert deliver(dispatcher).ambiguous
    outcome = deliver(dispatcher)
    assert outcome.provider == "mailgate" and not outcome.ambiguous
    assert len(transport.sent) == 2


def test_permanent_rejections_keep_the_circuit_closed() -> None:
    """An API that rejects content is up and deciding: rejections reset the failure count."""
    clock = Clock()
    answers = [HTTPResponse(503, (), b""), HTTPResponse(400, (), b"{}")] * 3
    transport = ScriptedTransport(*answers)
    dispatcher = Dispatcher({"p1": breaker_route("p1", transport)}, ("p1",), clock)
    for _ in range(6):
        deliver(dispatcher)
    assert len(transport.sent) == 6
    assert dispatcher.breakers["p1"].state is CircuitState.CLOSED


class Held:
    """A transport whose answers the test releases one by one."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred[HTTPResponse]] = []

    def send(self, request: Any) -> defer.Deferred[HTTPResponse]:
        d: defer.Deferred[HTTPResponse] = defer.Deferred()
        self.pending.append(d)
        return d


def test_concurrency_limit_holds_requests_back() -> None:
    """With max_concurrency=2 a third message waits for a free slot, then is sent."""
    clock = Clock()
    transport = Held()
    limits = RequestLimits(max_concurrency=2)
    dispatcher = Dispatcher({"p1": breaker_route("p1", transport, limits)}, ("p1",), clock)
    results = [dispatcher.deliver(EMAIL, Account(name="a"), f"Q{i}") for i in range(3)]
    assert len(transport.pending) == 2
    transport.pending[0].callback(ok("one"))
    assert results[0].result == Delivered("p1", "one")
    assert len(transport.pending) == 3
    assert not results[2].called


def test_saturated_provider_is_451_470_after_the_bounded_wait() -> None:
    """A message that cannot get a request slot within limit_wait is answered
    451 4.7.0; it was never sent, so it fails over, and the breaker does not count it."""
    clock = Clock()
    busy, backup = Held(), Always("backup")
    limits = RequestLimits(max_concurrency=1)
    dispatcher = Dispatcher({"p1": breaker_route("p1", busy, limits)}, ("p1",), clock, limit_wait=30)
    first = dispatcher.deliver(EMAIL, Account(name="a"), "Q1")
    waiting = dispatcher.deliver(EMAIL, Account(name="a"), "Q2")
    clock.advance(30)
    outcome = waiting.result
    assert (outcome.reply().code, outcome.enhanced, outcome.ambiguous) == (451, "4.7.0", False)
    assert "provider busy" in outcome.reason
    assert len(busy.pending) == 1 and not first.called
    assert dispatcher.breakers["p1"].consecutive_failures == 0

    both = Dispatcher(
        {"p1": breaker_route("p1", Held(), limits), "p2": breaker_route("p2", backup)}, ("p1", "p2"), clock
    )
    both.deliver(EMAIL, Account(name="a"), "Q3")
    failing_over = both.deliver(EMAIL, Account(name="a"), "Q4")
    clock.advance(30)
    assert failing_over.result == Delivered("p2", "backup-1")


def test_rate_limit_spaces_requests() -> None:
    """rate=1/s with burst 1: the second message is sent one second after the first."""
    clock = Clock()
    transport = Always("p1")
    limits = RequestLimits(max_concurrency=5, rate=1, burst=1)
    dispatcher = Dispatcher({"p1": breaker_route("p1", transport, limits)}, ("p1",), clock)
    first = dispatcher.deliver(EMAIL, Account(name="a"), "Q1")
    second = dispatcher.deliver(EMAIL, Account(name="a"), "Q2")
    assert first.called and not second.called
    clock.advance(1)
    assert second.result == Delivered("p1", "p1-2")


def test_probe_blocked_by_a_local_limit_is_given_back() -> None:
    """A half-open probe that times out in the request gate sent nothing: the next
    message may probe, instead of the circuit waiting forever."""
    clock = Clock()
    transport = Held()
    limits = RequestLimits(max_concurrency=1)
    dispatcher = Dispatcher({"p1": breaker_route("p1", transport, limits)}, ("p1",), clock, limit_wait=5)
    breaker = dispatcher.breakers["p1"]
    for _ in range(2):
        breaker.allow()
        breaker.record_failure()
    clock.advance(60)
    # A request from before the outage still holds the only slot.
    release = dispatcher.gates["p1"].acquire(None).result
    probe = dispatcher.deliver(EMAIL, Account(name="a"), "Q1")
    clock.advance(5)
    assert probe.result.enhanced == "4.7.0"
    release()
    second = dispatcher.deliver(EMAIL, Account(name="a"), "Q2")
    assert len(transport.pending) == 1
    transport.pending[0].callback(ok("back"))
    assert second.result == Delivered("p1", "back")
    assert breaker.state is CircuitState.CLOSED


def test_failure_after_a_partial_delivery_never_fails_over() -> None:
    """When an adapter needs several requests and one was accepted, a later connection
    error must not move the message to another provider (it would arrive twice)."""

    class TwoRequests(WebhookProvider):
        def build_requests(self, email: Any, account: Any, message_id: str) -> list[Any]:
            return super().build_requests(email, account, message_id) * 2

    first = ScriptedTransport(ok("half"), error.ConnectionRefusedError())
    second = ScriptedTransport(ok("x"))
    dispatcher = Dispatcher(
        {"p1": Route(TwoRequests("p1", {"url": "https://p1.example/v1"}), first), "p2": route("p2", second)},
        ("p1", "p2"),
        Clock(),
    )
    outcome = deliver(dispatcher)
    assert (outcome.provider, outcome.ambiguous, outcome.reply().code) == ("p1", True, 451)
    assert second.sent == []


def test_permanent_refusal_after_a_partial_delivery_says_so() -> None:
    """One reply per transaction: a 554 after an accepted request tells the sender
    that part of the message went out, so the bounce does not claim nobody got it."""

    class TwoRequests(WebhookProvider):
        def build_requests(self, email: Any, account: Any, message_id: str) -> list[Any]:
            return super().build_requests(email, account, message_id) * 2

    refusal = HTTPResponse(422, (("Content-Type", "application/json"),), b'{"message": "inactive recipient"}')
    transport = ScriptedTransport(ok("half"), refusal)
    dispatcher = Dispatcher(
        {"p1": Route(TwoRequests("p1", {"url": "https://p1.example/v1"}), transport)}, ("p1",), Clock()
    )
    reply = deliver(dispatcher).reply()
    assert reply.code == 554
    assert "1 of 2 requests were accepted before: " in reply.text
    assert "inactive recipient" in reply.text


def test_rate_limited_answers_do_not_open_the_circuit() -> None:
    """A 429 fails over to the next provider but never opens the circuit: the API is up,
    and the quota may be one passthrough client's own key."""
    clock = Clock()
    throttled = ScriptedTransport(*[HTTPResponse(429, (("Retry-After", "10"),), b"")] * 4)
    backup = Always("backup")
    dispatcher = Dispatcher(
        {"p1": breaker_route("p1", throttled), "p2": breaker_route("p2", backup)}, ("p1", "p2"), clock
    )
    for index in range(1, 5):
        assert deliver(dispatcher) == Delivered("p2", f"backup-{index}")
    assert len(throttled.sent) == 4
    assert dispatcher.breakers["p1"].state is CircuitState.CLOSED


def test_a_late_answer_from_before_the_outage_does_not_free_the_probe() -> None:
    """Half-open lets exactly one probe through, even when a request sent while the
    circuit was still closed comes back (here: 429) while the probe is out."""
    clock = Clock()
    transport = Held()
    backup = Always("backup")
    dispatcher = Dispatcher(
        {"p1": breaker_route("p1", transport), "p2": breaker_route("p2", backup)}, ("p1", "p2"), clock
    )
    breaker = dispatcher.breakers["p1"]

    def start() -> list[Any]:
        result: list[Any] = []
        dispatcher.deliver(EMAIL, Account(name="a"), "QID").addCallback(result.append)
        return result

    slow = start()  # sent while closed; its answer comes last
    for _ in range(FAST_OPEN.failures):  # the outage opens the circuit
        failing = start()
        transport.pending[-1].callback(HTTPResponse(503, (), b""))
        assert failing[0] == Delivered("p2", f"backup-{backup.sent}")
    assert breaker.state is CircuitState.OPEN
    clock.advance(FAST_OPEN.cooldown)
    probe = start()  # takes the half-open probe and waits
    assert breaker.state is CircuitState.HALF_OPEN
    sent = len(transport.pending)
    transport.pending[0].callback(HTTPResponse(429, (("Retry-After", "5"),), b""))
    assert slow[0] == Delivered("p2", f"backup-{backup.sent}")
    # The probe is still out: the next message must go to the backup, not probe again.
    assert deliver(dispatcher) == Delivered("p2", f"backup-{backup.sent}")
    assert len(transport.pending) == sent
    transport.pending[-1].callback(ok("p1-back"))
    assert probe == [Delivered("p1", "p1-back")]
    assert breaker.state is CircuitState.CLOSED


def test_reply_with_many_provider_ids_fits_one_reply_line() -> None:
    """A message sent in 50 requests names its ids in the 250 reply, cut to fit
    the 512-octet reply line of RFC 5321 §4.5.3.1.5, with how many were left out."""
    ids = [f"{index:02d}-0e4f7a52-3c1b-4d7e-9a0b-5f6e7d8c9b0a" for index in range(50)]
    (line,) = Delivered("p1", ",".join(ids)).reply().lines()
    assert len(line) + 2 <= 512
    shown = line.decode().removeprefix("250 2.0.0 Ok: ")
    listed, _, more = shown.partition(" (+")
    assert listed.split(",") == ids[: len(listed.split(","))]
    assert more == f"{50 - len(listed.split(','))} more)"
    assert Delivered("p1", "a,b").reply().lines() == [b"250 2.0.0 Ok: a,b"]
# -- the queue's journal hook ------------------------------------------------------


class PerRecipient(WebhookProvider):
    """An adapter that needs one request per recipient, and says whom each carries."""

    def build_requests(self, email: Any, account: Account, message_id: str) -> list[Any]:
        requests = []
        for recipient in email.envelope_recipients:
            single = parse_message(email.raw, email.envelope_sender, (recipient,))
            [request] = super().build_requests(single, account, message_id)
            requests.append(dataclasses.replace(request, recipients=(recipient,)))
        return requests


class UndeclaredPerRecipient(WebhookProvider):
    """One request per recipient, written before requests named their recipients."""

    def build_requests(self, email: Any, account: Account, message_id: str) -> list[Any]:
        requests = []
        for recipient in email.envelope_recipients:
            single = parse_message(email.raw, email.envelope_sender, (recipient,))
            requests.extend(super().build_requests(single, account, message_id))
        return requests


TWO = parse_message(RAW, "a@example.com", ("b@example.org", "c@example.org"))


def test_accepted_requests_are_reported_and_skipped_later() -> None:
    """on_delivered hears each accepted request with how many remain and whom it
    reached; requests in ``done`` are not sent again and keep their recorded ids; a
    failure after an accepted request does not fail over (part already went through
    this provider)."""
    first = ScriptedTransport(ok("r1"), HTTPResponse(503, (), b""))
    second = ScriptedTransport(ok("x"))
    dispatcher = Dispatcher(
        {"p1": Route(PerRecipient("p1", {"url": "https://p1.example/v1"}), first), "p2": route("p2", second)},
        ("p1", "p2"),
        Clock(),
    )
    heard: list[tuple[str, Delivered, int, tuple[str, ...] | None]] = []
    outcome = dispatcher.deliver(TWO, Account(name="a"), "QID", on_delivered=lambda *a: heard.append(a)).result
    assert isinstance(outcome, Retry) and outcome.ambiguous and second.sent == []
    [(key, delivered, remaining, recipients)] = heard
    assert (delivered, remaining, recipients) == (Delivered("p1", "r1"), 1, ("b@example.org",))
    assert key == request_key(first.sent[0])
    again = ScriptedTransport(ok("r2"))
    dispatcher.providers["p1"] = Route(PerRecipient("p1", {"url": "https://p1.example/v1"}), again)
    outcome = dispatcher.deliver(TWO, Account(name="a"), "QID", done={key: "r1"}).result
    assert outcome == Delivered("p1", "r1,r2")
    assert [json.loads(r.body)["envelope"]["rcpt_to"] for r in again.sent] == [["c@example.org"]]


def test_an_accepted_request_reaches_whom_it_names_or_else_nobody_known() -> None:
    """The recipients on_delivered hears: those the request names; the whole
    envelope for a message's only request; unknown (None) for one of several
    requests that names nobody, so the queue never takes anyone as delivered on
    a guess (their DSN would be lost)."""

    def heard(adapter: WebhookProvider, email: Any) -> list[tuple[str, ...] | None]:
        recipients: list[tuple[str, ...] | None] = []
        transport = ScriptedTransport(ok("r1"), ok("r2"))
        dispatcher = Dispatcher({"p": Route(adapter, transport)}, ("p",), Clock())
        outcome = dispatcher.deliver(
            email, Account(name="a"), "QID", on_delivered=lambda *a: recipients.append(a[3])
        ).result
        assert isinstance(outcome, Delivered)
        return recipients

    url = {"url": "https://p.example/v1"}
    assert heard(PerRecipient("p", url), TWO) == [("b@example.org",), ("c@example.org",)]
    assert heard(UndeclaredPerRecipient("p", url), TWO) == [None, None]
    assert heard(WebhookProvider("p", url), TWO) == [("b@example.org", "c@example.org")]


def test_request_key_ignores_headers_but_not_the_body() -> None:
    """A signature's timestamp does not change the key; another recipient does."""
    provider = WebhookProvider("p", {"url": "https://p.example/v1", "signing_secret": "s"})
    [one] = provider.build_requests(EMAIL, Account(name="a"), "Q")
    provider.clock = lambda: 12345.0
    [two] = provider.build_requests(EMAIL, Account(name="a"), "Q")
    assert one.headers != two.headers and request_key(one) == request_key(two)
    [other] = provider.build_requests(TWO, Account(name="a"), "Q")
    assert request_key(other) != request_key(one)


def test_refusal_only_when_no_provider_can_carry_it() -> None:
    """Queue mode refuses at DATA only if every provider on the route refuses the message."""

    class NoAttachments(WebhookProvider):
        def check(self, email: Any, account: Account) -> Failed:
            return Failed(self.name, "cannot carry it", 554, "5.6.0")

    refusing = Route(NoAttachments("r", {"url": "https://r.example"}), ScriptedTransport())
    accepting = route("a", ScriptedTransport())
    assert Dispatcher({"r": refusing}, ("r",), Clock()).refusal(EMAIL, Account(name="x")) == Failed("r", "cannot carry it", 554, "5.6.0")
    assert Dispatcher({"r": refusing, "a": accepting}, ("r", "a"), Clock()).refusal(EMAIL, Account(name="x")) is None


def test_recipient_limit_is_the_largest_on_the_route() -> None:
    """The session refuses recipients beyond what any provider of the route takes:
    the largest provider limit wins (failover may reach it); a provider without a
    limit, or an unknown name, lifts it."""

    class Limited(WebhookProvider):
        def __init__(self, name: str, limit: int) -> None:
            super().__init__(name, {"url": f"https://{name}.example/v1"})
            self.max_recipients = limit

    transport = Always("x")
    providers = {
        "fifty": Route(Limited("fifty", 50), transport),
        "thousand": Route(Limited("thousand", 1000), transport),
        "open": route("open", transport),
    }
    dispatcher = Dispatcher(providers, ("fifty",), Clock())
    assert dispatcher.recipient_limit(Account(name="a")) == 50
    assert dispatcher.recipient_limit(Account(name="a", route=("fifty", "thousand"))) == 1000
    assert dispatcher.recipient_limit(Account(name="a", route=("fifty", "open"))) is None
    assert dispatcher.recipient_limit(Account(name="a", route=("fifty", "missing"))) is None
