"""Queue mode on a Clock: acceptance into the spool, delivery, retries, Retry-After,
give-up with event and DSN, the lifetime, recovery after a restart, the per-request
journal, operator actions and shutdown."""

from __future__ import annotations

import base64
import dataclasses
import errno
import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailgate import spoolfiles
from mailgate.accounts.account import Account
from mailgate.dispatch import Dispatcher, Route
from mailgate.interfaces import IDeliverer, ITransport
from mailgate.message import parse_message
from mailgate.outcome import Failed
from mailgate.providers.base import HTTPRequest, HTTPResponse
from mailgate.providers.webhook import WebhookProvider
from mailgate.queue import Queued, QueueDeliverer, QueueRunner, undelivered_recipients
from mailgate.retry import RetryPolicy
from mailgate.spool import EntryState, Envelope, JournalRecord, Spool
from mailgate.spoolwriter import ThreadSpoolWriter
from tests.test_dispatch import PerRecipient as PerRecipientProvider

RAW = (
    b"Received: from client.example\r\nFrom: App <app@example.com>\r\nTo: b@example.org\r\n"
    b"Subject: hello\r\nMessage-ID: <m1@example.com>\r\nX-Mailgate-Tag: welcome\r\n\r\nbody\r\n"
)
ACCOUNT = Account(name="alice", route=("p1",))
PENDING = object()


def ok(identifier: str = "api-1") -> HTTPResponse:
    return HTTPResponse(200, (), json.dumps({"id": identifier}).encode())


def status(code: int, *headers: tuple[str, str]) -> HTTPResponse:
    return HTTPResponse(code, headers, b'{"message": "scripted"}')


@implementer(ITransport)
class ScriptedTransport:
    """Answers from a script (a response, an exception, or PENDING: a Deferred the
    test fires); once the script is used up, 200 with a fresh id."""

    def __init__(self, *answers: Any):
        self.answers = list(answers)
        self.sent: list[HTTPRequest] = []
        self.pending: list[defer.Deferred[HTTPResponse]] = []

    def send(self, request: HTTPRequest) -> defer.Deferred[HTTPResponse]:
        self.sent.append(request)
        answer = self.answers.pop(0) if self.answers else ok(f"api-{len(self.sent)}")
        if answer is PENDING:
            d: defer.Deferred[HTTPResponse] = defer.Deferred()
            self.pending.append(d)
            return d
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)

    def payloads(self) -> list[dict[str, Any]]:
        return [json.loads(request.body) for request in self.sent]


def delivery_status(payload: dict[str, Any]) -> str:
    """The message/delivery-status part of a DSN as the webhook carried it."""
    [report] = [a for a in payload["attachments"] if a["content_type"] == "message/delivery-status"]
    return base64.b64decode(report["content_base64"]).decode()


class Events:
    def __init__(self) -> None:
        self.emitted: list[tuple[str, dict[str, Any]]] = []

    def emit(self, kind: str, **fields: Any) -> None:
        self.emitted.append((kind, fields))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.emitted]


class Harness:
    """A spool, a runner and a queue deliverer on one Clock, delivering through scripted transports."""

    def __init__(self, directory: Path, transports: dict[str, ScriptedTransport], provider: type = WebhookProvider):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.transports = transports
        routes = {
            name: Route(provider(name, {"url": f"https://{name}.example/v1"}), transport)
            for name, transport in transports.items()
        }
        self.dispatcher = Dispatcher(routes, tuple(transports), self.clock)
        self.events = Events()
        self.spool = Spool(directory)
        self.spool.lock()
        self.runner = QueueRunner(
            self.spool,
            self.dispatcher,
            self.clock,
            RetryPolicy(),
            hostname="mx.example.net",
            events=self.events,  # type: ignore[arg-type]
            random=lambda: 0.5,  # no jitter: exact times
        )
        self.deliverer = QueueDeliverer(self.spool, self.runner, self.clock, refusal=self.dispatcher.refusal)
        self.runner.startService()

    def accept(self, sender: str = "app@example.com", recipients: tuple[str, ...] = ("b@example.org",),
               account: Account = ACCOUNT, queue_id: str = "AAAAAAAAAAAAAAAAAAAAAA", raw: bytes = RAW,
               prepare: bool = True) -> Any:
        """What the SMTP session does at the final dot: prepare (the spool file is
        written while the message is parsed), parse, deliver, release.  With
        ``prepare=False`` the deliverer stores the parsed message instead (the
        format of entries written before the two phases)."""
        if prepare:
            self.deliverer.prepare(queue_id, raw, sender, recipients, account)
        email = parse_message(raw, sender, recipients, account.defaults)
        try:
            return self.deliverer.deliver(email, account, queue_id).result
        finally:
            self.deliverer.release(queue_id)

    def restart(self) -> Harness:
        """Stop this runner (as at shutdown) and start a new one on the same spool."""
        self.runner.stopService()
        again = Harness.__new__(Harness)
        again.__dict__.update(self.__dict__)
        again.events = Events()
        again.spool = Spool(self.spool.directory)
        again.spool.lock()
        again.runner = QueueRunner(
            again.spool, self.dispatcher, self.clock, RetryPolicy(), hostname="mx.example.net",
            events=again.events, random=lambda: 0.5,  # type: ignore[arg-type]
        )
        again.deliverer = QueueDeliverer(again.spool, again.runner, self.clock, refusal=self.dispatcher.refusal)
        again.runner.startService()
        return again


@pytest.fixture
def harness(tmp_path: Path) -> Any:
    made: list[Harness] = []

    def make(provider: type = WebhookProvider, **transports: ScriptedTransport) -> Harness:
        h = Harness(tmp_path / "queue", transports, provider)
        made.append(h)
        return h

    yield make
    for h in made:
        h.runner.stopService()


def test_deliverer_provides_interface(harness: Any) -> None:
    """The queue-mode deliverer is an IDeliverer, like the dispatcher."""
    h = harness(p1=ScriptedTransport())
    assert verifyObject(IDeliverer, h.deliverer)


def test_accepted_message_is_spooled_then_delivered(harness: Any) -> None:
    """The reply is 250 queued as <id>; the API gets the message with the id as
    idempotency key and the control headers' values; the entry is then removed."""
    transport = ScriptedTransport(PENDING)
    h = harness(p1=transport)
    outcome = h.accept()
    assert outcome == Queued("AAAAAAAAAAAAAAAAAAAAAA")
    assert str(outcome.reply()) == "250 2.0.0 Ok: queued as AAAAAAAAAAAAAAAAAAAAAA"
    assert h.spool.ids() == ["AAAAAAAAAAAAAAAAAAAAAA"]  # on disk before the API answered
    assert h.runner.snapshot()["depth_by_state"] == {"queued": 0, "deferred": 0, "sending": 1}
    transport.pending[0].callback(ok("api-77"))
    [payload] = transport.payloads()
    assert payload["idempotency_key"] == "AAAAAAAAAAAAAAAAAAAAAA"
    assert payload["controls"]["tags"] == ["welcome"]
    assert h.spool.ids() == []
    assert h.events.emitted == [
        (
            "delivered",
            {
                "queue_id": "AAAAAAAAAAAAAAAAAAAAAA",
                "account": "alice",
                "sender": "app@example.com",
                "recipients": ("b@example.org",),
                "provider": "p1",
                "provider_message_id": "api-77",
                "attempts": 1,
            },
        )
    ]
    assert h.runner.snapshot() == {"depth_by_state": {"queued": 0, "deferred": 0, "sending": 0}, "oldest_age": None}


@pytest.mark.parametrize(("error", "reply"), [(errno.ENOSPC, "452 4.3.1"), (errno.EDQUOT, "452 4.3.1"), (errno.EIO, "451 4.3.0")])
def test_spool_write_failure_is_never_250(harness: Any, monkeypatch: pytest.MonkeyPatch, logged_errors: Any, error: int, reply: str) -> None:
    """Disk full answers 452 4.3.1, any other write error 451 4.3.0; nothing is queued or sent."""
    transport = ScriptedTransport()
    h = harness(p1=transport)

    def fail(*args: Any) -> None:
        raise OSError(error, "injected")

    monkeypatch.setattr(spoolfiles, "prepare_file", fail)
    outcome = h.accept()
    assert str(outcome.reply()).startswith(reply)
    assert transport.sent == [] and h.runner.snapshot()["depth_by_state"]["queued"] == 0
    assert len(logged_errors.take()) == 1


def test_a_message_that_cannot_be_encoded_for_the_spool_is_451(harness: Any, logged_errors: Any) -> None:
    """A failure while preparing the spool file (here an account setting JSON cannot
    hold: a bug, not the client's fault) answers 451 4.3.0, logged, and queues nothing."""
    transport = ScriptedTransport()
    h = harness(p1=transport)
    account = Account(name="alice", route=("p1",), provider_settings={"p1": {"key": b"not JSON"}})
    outcome = h.accept(account=account)
    assert str(outcome.reply()).startswith("451 4.3.0")
    assert h.spool.ids() == [] and list(h.spool.tmp.iterdir()) == [] and transport.sent == []
    assert len(logged_errors.take()) == 1


def test_a_large_message_is_encoded_for_the_spool_in_a_thread(harness: Any) -> None:
    """Checksumming megabytes would stall the reactor: a message over 64 KiB is
    encoded in the thread pool, and stored as received all the same."""
    h = harness(p1=ScriptedTransport(PENDING))
    ran: list[str] = []

    def in_thread(f: Any, *args: Any) -> defer.Deferred[Any]:
        ran.append(f.__name__)
        return defer.maybeDeferred(f, *args)

    h.deliverer.run_in_thread = in_thread
    raw = RAW + b"x" * 100 * 1024 + b"\r\n"
    assert h.accept(raw=raw) == Queued("AAAAAAAAAAAAAAAAAAAAAA")
    assert ran == ["encode_entry"]
    assert h.spool.load("AAAAAAAAAAAAAAAAAAAAAA")[1] == raw


def test_failed_directory_fsync_is_never_250(harness: Any, monkeypatch: pytest.MonkeyPatch, logged_errors: Any) -> None:
    """The file is written but its rename cannot be made durable: 451, and the
    renamed file is taken back, so a restart does not deliver what the client
    was told to send again."""
    transport = ScriptedTransport()
    h = harness(p1=transport)

    def fail(directory: Any) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(spoolfiles, "fsync_directory", fail)
    outcome = h.accept()
    assert str(outcome.reply()).startswith("451 4.3.0")
    assert h.spool.ids() == [] and list(h.spool.tmp.iterdir()) == []
    assert transport.sent == []
    assert len(logged_errors.take()) == 1


def test_concurrent_messages_share_spool_commits(tmp_path: Path) -> None:
    """Up to ``parallel`` batches are published at once; commits arriving meanwhile
    wait and go together in the next batch (one thread hand-off and one directory
    fsync for all), each answered on its own, a failure only for its own message."""
    spool = Spool(tmp_path / "queue")
    spool.create()
    calls: list[tuple[Any, tuple[Any, ...], defer.Deferred[Any]]] = []

    def in_thread(f: Any, *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        calls.append((f, args, d))
        return d

    writer = ThreadSpoolWriter(spool, in_thread, parallel=2)
    names = [letter * 22 for letter in "ABCDE"]
    results = [writer.commit(name) for name in names]
    assert [args[2] for _, args, _ in calls] == [["A" * 22], ["B" * 22]]  # A and B at once; C, D, E wait
    calls[0][2].callback([None])
    assert results[0].called and not results[2].called
    assert [args[2] for _, args, _ in calls][2] == ["C" * 22, "D" * 22, "E" * 22]  # together
    calls[2][2].callback([None, OSError(errno.ENOSPC, "full"), None])
    assert results[2].called and results[4].called
    failure = results[3].result
    results[3].addErrback(lambda _: None)
    assert failure.value.errno == errno.ENOSPC
    assert not results[1].called


def rfc822_headers(payload: dict[str, Any]) -> str:
    """The original headers a DSN quotes, as the webhook carried them."""
    [part] = [a for a in payload["attachments"] if a["content_type"] == "text/rfc822-headers"]
    return base64.b64decode(part["content_base64"]).decode()


def test_message_is_stored_as_received_and_parsed_again_the_same_way(harness: Any) -> None:
    """The spool keeps the message as the client sent it (written while the session
    parsed it).  After a restart it is parsed again exactly as at acceptance: the
    retry carries the same request, control headers and Bcc still taken out, the
    account's defaults applied; a DSN quotes the headers without them too."""
    raw = RAW.replace(
        b"X-Mailgate-Tag: welcome\r\n", b"X-Mailgate-Tag: promo\r\nBcc: hidden@example.org\r\nX-Campaign: 7\r\n"
    )
    account = Account(name="alice", route=("p1",), defaults={"X-Mailgate-Metadata-plan": "gold"})
    transport = ScriptedTransport(status(503), status(400))
    h = harness(p1=transport)
    h.accept(raw=raw, recipients=("b@example.org", "hidden@example.org"), account=account)
    envelope, stored = h.spool.load("AAAAAAAAAAAAAAAAAAAAAA")
    assert stored == raw and envelope.controls is None
    h = h.restart()
    h.clock.advance(60)
    first, again = transport.payloads()[:2]
    assert again == first
    assert again["controls"]["tags"] == ["promo"] and again["controls"]["metadata"] == {"plan": "gold"}
    assert again["envelope"]["rcpt_to"] == ["b@example.org", "hidden@example.org"]
    assert [bcc["address"] for bcc in again["bcc"]] == ["hidden@example.org"]
    forwarded = {header["name"].lower() for header in again["headers"]}
    assert forwarded == {"x-campaign"}  # neither the control header nor Bcc
    [bounce] = transport.payloads()[2:]
    quoted = rfc822_headers(bounce)
    assert "Subject: hello" in quoted and "Bcc" not in quoted and "X-Mailgate-Tag" not in quoted


def test_a_message_on_disk_is_250_even_if_it_cannot_be_scheduled(harness: Any, monkeypatch: pytest.MonkeyPatch, logged_errors: Any) -> None:
    """Once the message is durable the client hears 250, whatever happens next in
    this process (here a bug scheduling it): a restart delivers it."""
    transport = ScriptedTransport()
    h = harness(p1=transport)

    def broken(*args: Any) -> None:
        raise RuntimeError("scheduling bug")

    monkeypatch.setattr(h.runner, "enqueue", broken)
    assert h.accept() == Queued("AAAAAAAAAAAAAAAAAAAAAA")
    assert len(logged_errors.take()) == 1
    monkeypatch.undo()
    h = h.restart()
    h.clock.advance(0)
    assert len(transport.sent) == 1 and h.spool.ids() == []


def test_a_stored_message_that_no_longer_parses_bounces_without_its_hidden_headers(
    harness: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should a message read back from the spool fail to parse, it bounces (554
    5.6.0), and the DSN quotes its headers without Bcc and control headers, which
    the spool keeps as received."""
    raw = RAW.replace(b"X-Mailgate-Tag: welcome\r\n", b"X-Mailgate-Tag: promo\r\nBcc: hidden@example.org\r\n")
    transport = ScriptedTransport(status(503))
    h = harness(p1=transport)
    h.accept(raw=raw, recipients=("b@example.org", "hidden@example.org"))
    h = h.restart()
    from mailgate.message import MessageParseError

    def unparsable(raw: bytes, *args: Any) -> Any:
        if b"Undelivered Mail" in raw:  # the DSN itself parses as usual
            return parse_message(raw, *args)
        raise MessageParseError("scripted")

    h.runner.parse = unparsable
    h.clock.advance(60)
    [bounce] = transport.payloads()[1:]
    assert "Status: 5.6.0" in delivery_status(bounce)
    quoted = rfc822_headers(bounce)
    assert "Subject: hello" in quoted and "Bcc" not in quoted and "X-Mailgate-Tag" not in quoted


@pytest.mark.parametrize("refused_by", ["deliverer", "session"])
def test_prepared_message_refused_after_all_leaves_nothing(harness: Any, refused_by: str) -> None:
    """A message whose file was prepared, then refused (by the route, or by the
    session: From not allowed, client gone) leaves no file, and nothing is
    delivered, after a restart either."""
    transport = ScriptedTransport()
    h = harness(p1=transport)
    if refused_by == "deliverer":
        h.deliverer.refusal = lambda email, account: Failed("p1", "attachments are not supported", 554, "5.6.0")
        assert isinstance(h.accept(), Failed)
    else:
        h.deliverer.prepare("AAAAAAAAAAAAAAAAAAAAAA", RAW, "app@example.com", ("b@example.org",), ACCOUNT)
        h.deliverer.release("AAAAAAAAAAAAAAAAAAAAAA")
    assert list(h.spool.tmp.iterdir()) == [] and h.spool.ids() == []
    h = h.restart()
    h.clock.advance(3600)
    assert transport.sent == [] and h.events.emitted == []


def test_message_no_provider_can_carry_is_refused_at_data(harness: Any) -> None:
    """If every provider on the route refuses the message as such, the final dot gets
    the permanent reply at once instead of a 250 followed by a bounce."""
    h = harness(p1=ScriptedTransport())
    refusal = Failed("p1", "attachments are not supported", 554, "5.6.0")
    h.deliverer.refusal = lambda email, account: refusal
    assert h.accept() == refusal
    assert h.spool.ids() == []


def test_transient_failure_is_retried_after_backoff(harness: Any) -> None:
    """A 503 defers the message (state saved, event deferred) and retries it 60 s later, then 120 s."""
    transport = ScriptedTransport(status(503), status(503))
    h = harness(p1=transport)
    h.accept()
    assert len(transport.sent) == 1
    state = h.spool.read_state("AAAAAAAAAAAAAAAAAAAAAA")
    assert (state.attempts, state.next_attempt) == (1, h.clock.seconds() + 60)
    assert state.last_error == "451 4.3.0 Temporary failure at p1: API unavailable (HTTP 503)"
    h.clock.advance(59)
    assert len(transport.sent) == 1
    h.clock.advance(1)
    assert len(transport.sent) == 2
    h.clock.advance(119)
    assert len(transport.sent) == 2
    h.clock.advance(1)
    assert len(transport.sent) == 3
    assert h.spool.ids() == []
    assert h.events.kinds() == ["deferred", "deferred", "delivered"]
    assert {json.loads(r.body)["idempotency_key"] for r in transport.sent} == {"AAAAAAAAAAAAAAAAAAAAAA"}


def test_retry_after_is_honoured(harness: Any) -> None:
    """429 with Retry-After: 600 is not retried before 600 s, though backoff says 60."""
    transport = ScriptedTransport(status(429, ("Retry-After", "600")))
    h = harness(p1=transport)
    h.accept()
    h.clock.advance(599)
    assert len(transport.sent) == 1
    h.clock.advance(1)
    assert len(transport.sent) == 2 and h.spool.ids() == []


def test_ambiguous_timeout_retries_the_same_provider_later(harness: Any) -> None:
    """A timeout may mean the API took it: no failover, a later retry with the same key."""
    from mailgate.transports import APITimeout

    first, second = ScriptedTransport(APITimeout("no answer within 30 s")), ScriptedTransport()
    h = harness(p1=first, p2=second)
    h.accept(account=Account(name="alice", route=("p1", "p2")))
    assert second.sent == [] and len(first.sent) == 1
    h.clock.advance(60)
    assert len(first.sent) == 2 and second.sent == []
    assert h.spool.ids() == []


def test_permanent_failure_sends_a_dsn_through_the_route(harness: Any) -> None:
    """A 400 gives up at once: event failed, and a DSN from <> to the envelope sender,
    carrying the status, the API's reason and the original headers, goes out through
    the account's route."""
    transport = ScriptedTransport(status(400))
    h = harness(p1=transport)
    h.accept(sender="app@example.com")
    assert len(transport.sent) == 2
    bounce = transport.payloads()[1]
    assert bounce["envelope"] == {"mail_from": "", "rcpt_to": ["app@example.com"]}
    assert bounce["subject"] == "Undelivered Mail Returned to Sender"
    assert "HTTP 400: scripted" in bounce["text"]
    status_text = delivery_status(bounce)
    assert "Final-Recipient: rfc822; b@example.org" in status_text and "Status: 5.6.0" in status_text
    assert h.spool.ids() == []
    kinds = h.events.kinds()
    assert kinds == ["failed", "delivered"]  # the message failed; its DSN was delivered
    failed = h.events.emitted[0][1]
    assert failed["reason"] == "554 5.6.0 Rejected by p1: HTTP 400: scripted"
    assert failed["provider"] == "p1" and failed["attempts"] == 1


def test_no_dsn_for_the_null_sender(harness: Any) -> None:
    """A message from <> (itself a bounce) that fails is dropped with an event, never bounced."""
    transport = ScriptedTransport(status(400))
    h = harness(p1=transport)
    h.accept(sender="")
    assert len(transport.sent) == 1
    assert h.events.kinds() == ["failed"] and h.spool.ids() == []


def test_outage_longer_than_the_lifetime_gives_up_with_a_dsn(harness: Any) -> None:
    """An API down for six days: retries back off to hourly, the last one at exactly
    five days, then the sender gets a 4.4.7 DSN (sent once the API is back)."""
    transport = ScriptedTransport(*([status(503)] * 1000))
    h = harness(p1=transport)
    h.accept()
    for _ in range(6 * 24):
        h.clock.advance(3600)
    attempts = len([r for r in transport.sent if json.loads(r.body)["envelope"]["mail_from"]])
    # 1 + 60 s, 2, 4 ... 32 min (6 retries), then hourly until 5 days, the last at the deadline.
    assert 100 < attempts < 130
    failed = [fields for kind, fields in h.events.emitted if kind == "failed"]
    assert len(failed) == 1 and failed[0]["reason"].startswith(f"gave up after {failed[0]['attempts']} attempts in 5d0h")
    transport.answers = []  # the API is back: the DSN (itself deferred until now) goes out
    h.clock.advance(3600)
    bounces = [p for p in transport.payloads() if p["envelope"]["mail_from"] == ""]
    # One DSN, itself retried through the outage (same idempotency key), finally delivered.
    assert len({b["idempotency_key"] for b in bounces}) == 1
    assert "Status: 4.4.7" in delivery_status(bounces[-1])
    assert h.spool.ids() == []


@pytest.mark.parametrize("prepare", [True, False], ids=["stored-as-received", "stored-parsed"])
def test_recovery_after_restart_delivers_and_honours_the_saved_schedule(harness: Any, prepare: bool) -> None:
    """A deferred message survives a restart and is retried at its saved time, with
    its control values: parsed again from the message stored as received, or (an
    entry stored parsed, by an earlier version) from the envelope."""
    transport = ScriptedTransport(status(503))
    h = harness(p1=transport)
    h.accept(prepare=prepare)
    assert (h.spool.load("AAAAAAAAAAAAAAAAAAAAAA")[0].controls is None) is prepare
    h = h.restart()
    assert h.runner.snapshot()["depth_by_state"]["deferred"] == 1
    h.clock.advance(59)
    assert len(transport.sent) == 1
    h.clock.advance(1)
    assert len(transport.sent) == 2 and h.spool.ids() == []
    assert h.events.kinds() == ["delivered"]
    assert transport.payloads()[1]["controls"]["tags"] == ["welcome"]


def test_journal_keeps_delivered_recipients_from_being_sent_again(harness: Any) -> None:
    """A per-recipient adapter: the first recipient's request is accepted, the second
    fails; after a restart only the second is sent again, to the same provider."""
    p1 = ScriptedTransport(ok("r1"), status(503))
    p2 = ScriptedTransport()
    h = harness(PerRecipientProvider, p1=p1, p2=p2)
    h.accept(recipients=("b@example.org", "c@example.org"), account=Account(name="alice", route=("p1", "p2")))
    assert [p["envelope"]["rcpt_to"] for p in p1.payloads()] == [["b@example.org"], ["c@example.org"]]
    h = h.restart()
    h.clock.advance(60)
    assert [p["envelope"]["rcpt_to"] for p in p1.payloads()] == [["b@example.org"], ["c@example.org"], ["c@example.org"]]
    assert p2.sent == []
    assert h.spool.ids() == []
    assert h.events.emitted[0][1]["provider_message_id"] == "r1,api-3"


# -- DSNs after a partial delivery -------------------------------------------------

THREE = ("b@example.org", "c@example.org", "d@example.org")
SPLIT = Account(name="alice", route=("p1",))


def bounces(transport: ScriptedTransport) -> list[dict[str, Any]]:
    return [p for p in transport.payloads() if p["envelope"]["mail_from"] == ""]


def final_recipients(bounce: dict[str, Any]) -> list[str]:
    """The Final-Recipient fields of a DSN, in order (RFC 3464 §2.3.2)."""
    return [
        line.removeprefix("Final-Recipient: rfc822; ")
        for line in delivery_status(bounce).splitlines()
        if line.startswith("Final-Recipient:")
    ]


def test_dsn_after_a_partial_delivery_names_only_who_did_not_get_it(harness: Any) -> None:
    """One request per recipient: b's is accepted, c's refused for good, d's never
    sent.  The DSN and the failed event name c and d only; b is nowhere said to
    have failed, in the report or in its human-readable part."""
    p1 = ScriptedTransport(ok("r1"), status(400))
    h = harness(PerRecipientProvider, p1=p1)
    h.accept(recipients=THREE, account=SPLIT)
    [bounce] = bounces(p1)
    assert final_recipients(bounce) == ["c@example.org", "d@example.org"]
    assert "b@example.org" not in bounce["text"] and "<c@example.org>:" in bounce["text"]
    assert "1 of 3 requests were accepted before" in " ".join(bounce["text"].split())
    [failed] = [fields for kind, fields in h.events.emitted if kind == "failed"]
    assert failed["recipients"] == ("c@example.org", "d@example.org")
    assert h.spool.ids() == []


def test_dsn_after_a_restart_leaves_out_recipients_journaled_before(harness: Any) -> None:
    """b's request is accepted, c's fails transiently; after a restart (the journal
    read back from disk) c's is refused for good: the DSN names c alone, with
    Status 5.6.0, and b's request is not sent again."""
    p1 = ScriptedTransport(ok("r1"), status(503), status(400))
    h = harness(PerRecipientProvider, p1=p1)
    h.accept(recipients=THREE[:2], account=SPLIT)
    h = h.restart()
    h.clock.advance(60)
    sent = [p["envelope"]["rcpt_to"] for p in p1.payloads() if p["envelope"]["mail_from"]]
    assert sent == [["b@example.org"], ["c@example.org"], ["c@example.org"]]
    [bounce] = bounces(p1)
    assert final_recipients(bounce) == ["c@example.org"]
    assert "Status: 5.6.0" in delivery_status(bounce)
    assert [fields["recipients"] for kind, fields in h.events.emitted if kind == "failed"] == [("c@example.org",)]


class BatchProvider(WebhookProvider):
    """One request carrying a copy per recipient (as a Postmark batch): an answer
    naming ``reached`` refuses the request for good, though those copies went out."""

    def classify(self, request: HTTPRequest, response: HTTPResponse) -> Any:
        reached = (response.json() or {}).get("reached")
        if reached is None:
            return super().classify(request, response)
        return Failed(self.name, "one copy refused", 550, "5.1.1", reached=tuple(reached))


def test_dsn_leaves_out_copies_the_failing_request_delivered(harness: Any) -> None:
    """The only request of the message is refused for good, yet the API accepted
    b's and d's copies in it: the DSN and the failed event name c alone."""
    answer = HTTPResponse(422, (), json.dumps({"reached": ["b@example.org", "d@example.org"]}).encode())
    p1 = ScriptedTransport(answer)
    h = harness(BatchProvider, p1=p1)
    h.accept(recipients=THREE, account=SPLIT)
    [bounce] = bounces(p1)
    assert final_recipients(bounce) == ["c@example.org"]
    [failed] = [fields for kind, fields in h.events.emitted if kind == "failed"]
    assert failed["recipients"] == ("c@example.org",)
    assert h.spool.ids() == []


def test_expiry_after_a_partial_delivery_bounces_only_the_rest(harness: Any) -> None:
    """b's request is accepted, c's keeps failing transiently until the queue
    lifetime is over: the 4.4.7 DSN names c only."""
    p1 = ScriptedTransport(ok("r1"), *([status(503)] * 200))
    h = harness(PerRecipientProvider, p1=p1)
    h.accept(recipients=THREE[:2], account=SPLIT)
    for _ in range(5 * 24 + 1):
        h.clock.advance(3600)
    p1.answers = []
    h.clock.advance(3600)
    [bounce] = bounces(p1)[-1:]
    assert final_recipients(bounce) == ["c@example.org"] and "Status: 4.4.7" in delivery_status(bounce)


def test_deleting_a_partly_delivered_message_names_only_the_rest(harness: Any) -> None:
    """``mailgate queue delete`` after b's request was accepted and c's deferred:
    the failed event ("deleted by the operator") names c only, as a DSN would."""
    p1 = ScriptedTransport(ok("r1"), status(503))
    h = harness(PerRecipientProvider, p1=p1)
    h.accept(recipients=THREE[:2], account=SPLIT)
    assert h.runner.delete("AAAAAAAAAAAAAAAAAAAAAA").result == "deleted"
    [failed] = [fields for kind, fields in h.events.emitted if kind == "failed"]
    assert failed["recipients"] == ("c@example.org",) and failed["reason"] == "deleted by the operator"
    assert h.spool.ids() == []


def test_unreadable_journal_still_knows_what_this_process_saw(
    harness: Any, monkeypatch: pytest.MonkeyPatch, logged_errors: Any
) -> None:
    """A journal that cannot be read when the message fails is logged; requests
    this process saw accepted still keep their recipients out of the DSN."""
    p1 = ScriptedTransport(ok("r1"), status(400))
    h = harness(PerRecipientProvider, p1=p1)

    readable = h.spool.read_journal

    def unreadable(queue_id: str) -> Any:
        if queue_id == "AAAAAAAAAAAAAAAAAAAAAA":
            raise OSError(errno.EIO, "injected")
        return readable(queue_id)  # the DSN's own

    monkeypatch.setattr(h.spool, "read_journal", unreadable)
    h.accept(recipients=THREE, account=SPLIT)
    [bounce] = bounces(p1)
    assert final_recipients(bounce) == ["c@example.org", "d@example.org"]
    [event] = logged_errors.take()
    assert "cannot read the journal" in event["log_format"]


def test_old_journal_lines_prove_no_delivery(harness: Any) -> None:
    """A journal line written by an earlier version names nobody: its request is
    still not sent again, but the DSN cannot leave anyone out on its account."""
    p1 = ScriptedTransport(ok("r1"), status(503), status(400))
    h = harness(PerRecipientProvider, p1=p1)
    h.accept(recipients=THREE[:2], account=SPLIT)
    journal = h.spool.messages / "AAAAAAAAAAAAAAAAAAAAAA.journal"
    old = [json.loads(line) for line in journal.read_bytes().split(b"\n") if line]
    assert [record["recipients"] for record in old] == [["b@example.org"]]
    journal.write_bytes(b"".join(
        json.dumps({k: v for k, v in record.items() if k != "recipients"}).encode() + b"\n" for record in old
    ))
    h = h.restart()
    h.clock.advance(60)
    assert [p["envelope"]["rcpt_to"] for p in p1.payloads()][:3] == [["b@example.org"], ["c@example.org"], ["c@example.org"]]
    [bounce] = bounces(p1)
    assert final_recipients(bounce) == ["b@example.org", "c@example.org"]


def test_undelivered_recipients_compare_addresses_case_insensitively() -> None:
    """Whom no accepted request reached, in envelope order: addresses match whatever
    their case; a record with unknown recipients (an older journal line) reaches nobody."""
    records = [
        JournalRecord("k1", "p1", "r1", ("B@Example.ORG",)),
        JournalRecord("k2", "p1", "r2", None),
        JournalRecord("k3", "p1", "r3", ()),
    ]
    assert undelivered_recipients(("b@example.org", "c@example.org", "d@example.org"), records) == (
        "c@example.org",
        "d@example.org",
    )
    assert undelivered_recipients(("b@example.org",), records) == ()


def test_single_request_failure_still_bounces_every_recipient(harness: Any) -> None:
    """A message sent in one request that is refused: every envelope recipient is in
    the DSN and the failed event, as before."""
    p1 = ScriptedTransport(status(400))
    h = harness(p1=p1)
    h.accept(recipients=THREE)
    [bounce] = bounces(p1)
    assert final_recipients(bounce) == list(THREE)
    [failed] = [fields for kind, fields in h.events.emitted if kind == "failed"]
    assert failed["recipients"] == THREE


def test_no_dsn_when_every_recipient_was_reached(harness: Any) -> None:
    """A request that fails after every recipient's request was accepted (here an
    extra one repeating b) leaves nobody to bounce for: no DSN, and the event says
    delivered, with the ids of the accepted requests."""

    class ThenARepeat(PerRecipientProvider):
        def build_requests(self, email: Any, account: Account, message_id: str) -> list[HTTPRequest]:
            requests = super().build_requests(email, account, message_id)
            repeat = dataclasses.replace(requests[0], url=requests[0].url + "/again")
            return [*requests, repeat]

    p1 = ScriptedTransport(ok("r1"), ok("r2"), status(400))
    h = harness(ThenARepeat, p1=p1)
    h.accept(recipients=THREE[:2], account=SPLIT)
    assert len(p1.sent) == 3 and bounces(p1) == []
    assert h.events.kinds() == ["delivered"]
    assert h.events.emitted[0][1]["provider_message_id"] == "r1,r2"
    assert h.spool.ids() == []


def test_operator_retry_delete_and_flush(harness: Any) -> None:
    """retry makes a deferred entry due now; delete removes one without a DSN; flush
    attempts everything and reports how it went."""
    transport = ScriptedTransport(status(503), status(503), status(503))
    h = harness(p1=transport)
    h.accept(queue_id="AAAAAAAAAAAAAAAAAAAAAA")
    h.accept(queue_id="BBBBBBBBBBBBBBBBBBBBBB")
    h.accept(queue_id="CCCCCCCCCCCCCCCCCCCCCC")
    [listed] = h.runner.describe("AAAAAAAAAAAAAAAAAAAAAA")
    assert (listed["state"], listed["attempts"], listed["sender"]) == ("deferred", 1, "app@example.com")
    assert "provider_settings" not in json.dumps(listed)
    assert h.runner.retry_now("AAAAAAAAAAAAAAAAAAAAAA") == "scheduled for immediate delivery"
    assert h.spool.ids() == ["BBBBBBBBBBBBBBBBBBBBBB", "CCCCCCCCCCCCCCCCCCCCCC"]
    assert h.runner.delete("BBBBBBBBBBBBBBBBBBBBBB").result == "deleted"
    assert h.spool.ids() == ["CCCCCCCCCCCCCCCCCCCCCC"]
    flushed = h.runner.flush()
    assert flushed.result == {"delivered": 1}
    assert h.spool.ids() == [] and len(transport.sent) == 5
    assert [k for k, f in h.events.emitted if f["queue_id"] == "BBBBBBBBBBBBBBBBBBBBBB"] == ["deferred", "failed"]


class PausedThreads:
    """A ``run_in_thread`` whose calls wait until the test lets them run (a slow disk)."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Any, tuple[Any, ...], defer.Deferred[Any]]] = []

    def __call__(self, f: Any, *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.waiting.append((f, args, d))
        return d

    def names(self) -> list[str]:
        return [f.__name__ for f, _, _ in self.waiting]

    def run_next(self) -> None:
        f, args, d = self.waiting.pop(0)
        defer.maybeDeferred(f, *args).chainDeferred(d)


def test_delete_removes_the_files_in_a_thread(harness: Any) -> None:
    """``mailgate queue delete`` never unlinks on the reactor thread: the entry leaves
    the queue at once (no attempt starts), the files go in the thread pool, and the
    answer comes once they are gone."""
    h = harness(p1=ScriptedTransport(status(503)))
    h.accept()
    threads = PausedThreads()
    h.runner.run_in_thread = threads
    answer = h.runner.delete("AAAAAAAAAAAAAAAAAAAAAA")
    assert "AAAAAAAAAAAAAAAAAAAAAA" not in h.runner and not answer.called
    # The journal (who already got it, for the event) is read before the removal takes it.
    assert threads.names() == ["read_journal"] and h.spool.ids() == ["AAAAAAAAAAAAAAAAAAAAAA"]
    threads.run_next()
    assert threads.names() == ["remove"] and h.spool.ids() == ["AAAAAAAAAAAAAAAAAAAAAA"]
    threads.run_next()
    assert answer.result == "deleted" and h.spool.ids() == []
    assert h.events.kinds() == ["deferred", "failed"]


def test_delete_during_an_attempt_takes_effect_when_it_ends(harness: Any) -> None:
    """An entry being sent is removed after its attempt, even if that attempt failed."""
    transport = ScriptedTransport(PENDING)
    h = harness(p1=transport)
    h.accept()
    assert h.runner.delete("AAAAAAAAAAAAAAAAAAAAAA") == "deleted after the delivery attempt in progress ends"
    assert h.spool.ids() == ["AAAAAAAAAAAAAAAAAAAAAA"]
    transport.pending[0].callback(status(503))
    assert h.spool.ids() == [] and h.events.kinds() == ["failed"]
    h.clock.advance(3600)
    assert len(transport.sent) == 1


def test_delete_while_the_outcome_is_being_saved_is_not_lost(harness: Any) -> None:
    """A delete that arrives while a failed attempt's retry state is being written
    (in a thread) still removes the entry: it is never sent again."""
    transport = ScriptedTransport(status(503))
    h = harness(p1=transport)
    saving: list[defer.Deferred[None]] = []

    def run_in_thread(f: Any, *args: Any) -> defer.Deferred[Any]:
        result = defer.maybeDeferred(f, *args)
        if f == h.spool.write_state:
            paused: defer.Deferred[None] = defer.Deferred()
            saving.append(paused)
            return paused.addCallback(lambda _: result)
        return result

    h.runner.run_in_thread = run_in_thread
    h.accept()
    assert len(saving) == 1
    assert h.runner.delete("AAAAAAAAAAAAAAAAAAAAAA") == "deleted after the delivery attempt in progress ends"
    saving[0].callback(None)
    assert h.spool.ids() == [] and "AAAAAAAAAAAAAAAAAAAAAA" not in h.runner
    h.clock.advance(3600)
    assert len(transport.sent) == 1
    assert h.events.kinds()[-1] == "failed"


def test_delete_during_an_attempt_that_delivers_reports_it_delivered(harness: Any) -> None:
    """The API took the message before the delete took effect: the event says delivered."""
    transport = ScriptedTransport(PENDING)
    h = harness(p1=transport)
    h.accept()
    h.runner.delete("AAAAAAAAAAAAAAAAAAAAAA")
    transport.pending[0].callback(ok())
    assert h.spool.ids() == [] and h.events.kinds() == ["delivered"]


def test_concurrency_is_bounded(harness: Any) -> None:
    """No more than max_in_flight messages are being sent at once; the rest wait their turn."""
    transport = ScriptedTransport(*([PENDING] * 5))
    h = harness(p1=transport)
    h.runner.max_in_flight = 2
    for letter in "ABCDE":
        h.accept(queue_id=letter * 22)
    assert len(transport.sent) == 2
    assert h.runner.snapshot()["depth_by_state"] == {"queued": 3, "deferred": 0, "sending": 2}
    transport.pending[0].callback(ok())
    assert len(transport.sent) == 3


def test_messages_waiting_behind_a_backlog_are_not_kept_in_memory(harness: Any) -> None:
    """Beyond max_in_flight waiting messages, the parsed copy is dropped (memory stays
    bounded while an API is slow) and the message is read back from the spool when its turn comes."""
    transport = ScriptedTransport(*([PENDING] * 2))
    h = harness(p1=transport)
    h.runner.max_in_flight = 2
    ids = [letter * 22 for letter in "ABCDEFG"]
    for queue_id in ids:
        h.accept(queue_id=queue_id)
    held = [queue_id for queue_id in ids if h.runner._entries[queue_id].email is not None]
    assert held == ids[2:4]  # A and B are being sent; C and D wait parsed; the rest on disk only
    for pending in transport.pending:
        pending.callback(ok())
    assert h.spool.ids() == [] and len(transport.sent) == 7
    assert {p["subject"] for p in transport.payloads()} == {"hello"}


def test_flush_ends_even_when_an_attempt_crashes(harness: Any, logged_errors: Any) -> None:
    """A bug in an attempt must not leave `mailgate queue flush` waiting forever."""
    h = harness(p1=ScriptedTransport(status(503)))
    h.accept()
    h.dispatcher.deliver = lambda *args, **kwargs: defer.fail(RuntimeError("bug"))
    flushed = h.runner.flush()
    assert flushed.result == {"deferred": 1}
    assert logged_errors.take()
    assert h.spool.ids() == ["AAAAAAAAAAAAAAAAAAAAAA"]


def test_snapshot_reports_the_oldest_age(harness: Any) -> None:
    """/metrics gets the age of the oldest entry."""
    h = harness(p1=ScriptedTransport(status(503)))
    h.accept()
    h.clock.advance(42)
    assert h.runner.snapshot() == {"depth_by_state": {"queued": 0, "deferred": 1, "sending": 0}, "oldest_age": 42}


def test_shutdown_waits_for_attempts_in_progress(harness: Any) -> None:
    """Stopping starts no new attempt and waits for the running one; a message that
    arrives after the queue stopped is refused with 451 4.3.0 (the client keeps it)."""
    transport = ScriptedTransport(PENDING)
    h = harness(p1=transport)
    h.accept(queue_id="AAAAAAAAAAAAAAAAAAAAAA")
    stopped = h.runner.stopService()
    assert not stopped.called
    assert str(h.accept(queue_id="BBBBBBBBBBBBBBBBBBBBBB").reply()).startswith("451 4.3.0")
    assert len(transport.sent) == 1
    transport.pending[0].callback(ok())
    assert stopped.called
    assert h.spool.ids() == []


def test_shutdown_grace_leaves_a_stuck_attempt_in_the_spool(harness: Any) -> None:
    """An API that does not answer within the grace does not hold up the shutdown;
    the message stays queued and is tried again at the next start."""
    transport = ScriptedTransport(PENDING)
    h = harness(p1=transport)
    h.accept()
    stopped = h.runner.stopService()
    h.clock.advance(30)
    assert stopped.called
    assert h.spool.ids() == ["AAAAAAAAAAAAAAAAAAAAAA"]
    assert h.spool.read_state("AAAAAAAAAAAAAAAAAAAAAA") == EntryState()


def test_stop_within_bounds_the_wait_for_attempts_in_progress(harness: Any) -> None:
    """stop_within(seconds) waits only that long (the gateway passes what is left of
    its one shutdown grace); a stuck attempt stays in the spool.  With nothing left,
    the stop is immediate."""
    h = harness(p1=ScriptedTransport(PENDING, PENDING))
    h.accept()
    stopped = h.runner.stop_within(5)
    h.clock.advance(4.9)
    assert not stopped.called
    h.clock.advance(0.1)
    assert stopped.called and h.spool.ids() == ["AAAAAAAAAAAAAAAAAAAAAA"]
    again = h.restart()  # The recovered message is being sent again.
    stopped = again.runner.stop_within(0)
    again.clock.advance(0)
    assert stopped.called and again.spool.ids() == ["AAAAAAAAAAAAAAAAAAAAAA"]


def test_mode_is_the_listeners_unless_the_account_overrides_it() -> None:
    """A queue listener queues, except for an account set to sync (and vice versa)."""
    from mailgate.modes import ModeDeliverer

    sync, queue = FakeDeliverer("sync"), FakeDeliverer("queue")
    email = parse_message(RAW, "a@example.com", ("b@example.org",))
    listener = ModeDeliverer("queue", {"sync": sync, "queue": queue})
    assert verifyObject(IDeliverer, listener)
    assert listener.deliver(email, Account(name="a"), "Q") == "queue"
    assert listener.deliver(email, Account(name="a", delivery_mode="sync"), "Q") == "sync"
    assert ModeDeliverer("sync", {"sync": sync, "queue": queue}).deliver(email, Account(name="b", delivery_mode="queue"), "Q") == "queue"


class FakeDeliverer:
    def __init__(self, answer: str):
        self.answer = answer

    def deliver(self, email: Any, account: Account, queue_id: str) -> str:
        return self.answer


def test_queue_opens_when_the_state_directory_appears(tmp_path: Path) -> None:
    """mailgate never creates its state directory: until it exists queue mode answers
    451 4.3.0 (the client keeps the message); once it does, the queue opens (at the
    next check, or at once when asked) and accepts."""
    clock = Clock()
    state = tmp_path / "state"
    spool = Spool(state / "queue")
    transport = ScriptedTransport()
    dispatcher = Dispatcher({"p1": Route(WebhookProvider("p1", {"url": "https://p1.example/v1"}), transport)}, ("p1",), clock)
    runner = QueueRunner(spool, dispatcher, clock, RetryPolicy(), hostname="mx.example.net")
    deliverer = QueueDeliverer(spool, runner, clock)
    runner.startService()
    email = parse_message(RAW, "app@example.com", ("b@example.org",))
    assert str(deliverer.deliver(email, ACCOUNT, "A" * 22).result.reply()).startswith("451 4.3.0")
    assert runner.open_spool().result is False and not state.exists()
    state.mkdir()
    clock.advance(10)
    assert runner.is_open
    assert deliverer.deliver(email, ACCOUNT, "B" * 22).result == Queued("B" * 22)
    assert len(transport.sent) == 1
    runner.stopService()


def test_reopening_the_spool_runs_in_a_thread(tmp_path: Path) -> None:
    """Once running, the spool is opened (lock, recovery) in the thread pool, by the
    periodic retry and by /readyz alike: a slow disk stalls no session.  Callers
    meanwhile share the one attempt, and the queue opens (and delivers what it
    recovered) only when the thread is done."""
    clock = Clock()
    state = tmp_path / "state"
    earlier = Spool(state / "queue")
    state.mkdir()
    earlier.lock()
    envelope = Envelope("A" * 22, clock.seconds(), "app@example.com", ("b@example.org",), ACCOUNT)
    earlier.write(envelope, RAW)
    earlier.unlock()
    (state / "queue").rename(tmp_path / "kept")
    state.rmdir()
    transport = ScriptedTransport()
    dispatcher = Dispatcher({"p1": Route(WebhookProvider("p1", {"url": "https://p1.example/v1"}), transport)}, ("p1",), clock)
    threads = PausedThreads()
    runner = QueueRunner(
        Spool(state / "queue"), dispatcher, clock, RetryPolicy(), hostname="mx.example.net", run_in_thread=threads
    )
    runner.startService()  # At start-up, on this thread: the directory is missing.
    assert not runner.is_open and threads.waiting == []
    clock.advance(10)  # The periodic retry goes to a thread.
    assert threads.names() == ["_lock_and_recover"]
    probe = runner.open_spool()
    assert threads.names() == ["_lock_and_recover"]  # Shared, not a second attempt.
    threads.run_next()
    assert probe.result is False and not runner.is_open
    state.mkdir()
    (tmp_path / "kept").rename(state / "queue")
    clock.advance(10)
    probe = runner.open_spool()
    assert not probe.called and not runner.is_open
    threads.run_next()
    assert probe.result is True and runner.is_open
    assert threads.names() == ["load"]  # Delivering the recovered message has begun.
    runner.stopService()
