"""Stateful fuzzing of the SMTP session: random dialogues, random packet splits, random TLS points.

A hypothesis ``RuleBasedStateMachine`` drives one :class:`mailgate.smtp.SMTPSession`
over ``StringTransport`` and a ``Clock``: rules queue commands and message data
(honest and hostile), deliver the queued bytes in random splits, complete a
pending STARTTLS handshake at a random later point, answer pending deliveries
with random outcomes and move time.  After every step the invariants of
SECURITY.md hold:

* every reply line is well formed (``tests.smtp_helpers.Client`` checks each);
* nothing is written after the session closed, and a ``220`` to STARTTLS is
  the last thing written before the handshake (nothing answered "inside" TLS
  that was sent before it);
* input buffers stay bounded;
* exactly one delivery per accepted DATA: never more deliveries than ``354``
  replies, and every ``250`` verdict matches a delivery the fake API accepted;
* nothing is logged as an error (the autouse ``logged_errors`` fixture).

The budget is fixed and derandomised (no example database), so CI runs the
same examples every time, in well under a minute.
"""

from __future__ import annotations

from ipaddress import ip_network
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from mailgate import smtp
from mailgate.auth import MAX_AUTH_LINE
from mailgate.framing import MAX_LINE
from mailgate.outcome import Delivered, Failed, Retry
from tests.smtp_helpers import TRUSTED, FakeDeliverer, b64, connect, plain
from tests.test_smtp_fuzz import COMMANDS

MAX_CHUNK = 4096
COMMAND = st.one_of(
    COMMANDS,
    st.sampled_from(
        [
            b"EHLO client.test",
            b"STARTTLS",
            b"AUTH PLAIN " + plain("alice", "s3cret"),
            b"AUTH PLAIN " + plain("bob", "hunter2"),
            b"AUTH LOGIN " + b64("alice"),
            b"AUTH CRAM-MD5",
            b"MAIL FROM:<alice@example.com> SIZE=100",
            b"MAIL FROM:<bob@example.com>",
            b"RCPT TO:<bob@example.net>",
            b"RCPT TO:<carol@example.net>",
            b"DATA",
            b"BDAT 10 LAST",
            b"RSET",
            b"QUIT",
        ]
    ),
    st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b),
)
SEPARATOR = st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r", b"", b"\r\r\n"])
HEADERS = b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: s\r\n\r\n"
BODY = st.sampled_from(
    [
        HEADERS + b"hello\r\n.\r\n",
        HEADERS + b"..dot\r\n.\r\n",
        HEADERS + b"smuggle\n.\nMAIL FROM:<m@example.com>\r\nRCPT TO:<v@example.net>\r\nDATA\r\nx\r\n.\r\n",
        HEADERS + b"smuggle\r.\rRSET\r\n.\r\n",
        HEADERS + b"nul\x00\r\n.\r\n",
        HEADERS + b"L" * (MAX_LINE + 10) + b"\r\nQUIT\r\n.\r\n",
        HEADERS + b"big\r\n" * 2000 + b".\r\n",
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"--b\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" * 40 + b".\r\n",
        HEADERS + b"half a message without its end\r\n",
        b".\r\n",
    ]
)
OUTCOME = st.sampled_from(
    [Delivered("fake", "prov-1"), Retry("fake", "busy", "4.3.0"), Failed("fake", "rejected", 554, "5.6.0")]
)


class SessionMachine(RuleBasedStateMachine):
    """One session under a random client; see the module docstring for the invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.client: Any = None
        self.pending = b""
        self.lines: list[str] = []
        self.closed_at: int | None = None
        self.handshake_pending = False
        self.heard_delivered = 0
        self.data_starts = 0

    @initialize(role=st.sampled_from(["submission", "submissions", "relay"]), immediate=st.booleans())
    def connect(self, role: str, immediate: bool) -> None:
        deliverer = FakeDeliverer(outcome=Delivered("fake", "prov-1") if immediate else None)
        options: dict[str, Any] = dict(
            deliverer=deliverer,
            cram_md5=True,
            max_message_size=6000,
            max_recipients=3,
            auth_failure_delay=0.5,
            command_timeout=300,
            session_lifetime=3600,
        )
        if role == "relay":
            options.update(peer="127.0.0.1", trusted_networks=(ip_network("127.0.0.0/8"),), trusted_account=TRUSTED)
        self.client = connect(role, **options)
        if role == "submissions":
            self.client.session.handshakeCompleted()
        self.lines.append("220 (greeting)")

    # -- what the client queues --------------------------------------------------------

    @rule(body=BODY)
    def honest_step(self, body: bytes) -> None:
        """Queue what a well-behaved client would send next, so that the random rules
        around it reach every state (TLS, AUTH, MAIL, RCPT, DATA, verdicts)."""
        self._queue_next(body)

    @rule(body=BODY)
    def honest_exchange(self, body: bytes) -> None:
        """The same, sent at once with everything queued before it."""
        self._queue_next(body)
        self.deliver_all()

    def _queue_next(self, body: bytes) -> None:
        session = self.client.session
        role = session.policy.role
        if session._reader is not None:
            self.pending += body
        elif session._helo is None or not session._esmtp:
            self.pending += b"EHLO client.test\r\n"
        elif role != "relay" and not session._tls_active:
            self.pending += b"STARTTLS\r\n"
        elif role != "relay" and session.account is None:
            self.pending += b"AUTH PLAIN " + plain("alice", "s3cret") + b"\r\n"
        elif session._sender is None:
            self.pending += b"MAIL FROM:<alice@example.com>\r\n"
        elif not session._recipients:
            self.pending += b"RCPT TO:<bob@example.net>\r\n"
        else:
            self.pending += b"DATA\r\n"

    @rule(command=COMMAND, separator=SEPARATOR)
    def queue_command(self, command: bytes, separator: bytes) -> None:
        self.pending += command + separator

    @rule(body=BODY)
    def queue_message_data(self, body: bytes) -> None:
        self.pending += body

    @rule(command=COMMAND)
    def queue_starttls_injection(self, command: bytes) -> None:
        """The CVE-2011-0411 move: a command in the same packet as STARTTLS."""
        self.pending += b"STARTTLS\r\n" + command + b"\r\n"
        self.deliver_all()

    @rule(blob=st.binary(min_size=1, max_size=300))
    def queue_junk(self, blob: bytes) -> None:
        self.pending += blob

    @rule(size=st.sampled_from([MAX_AUTH_LINE + 10, 70000]))
    def queue_unterminated_flood(self, size: int) -> None:
        self.pending += b"A" * size

    # -- what reaches the server -----------------------------------------------------------

    @precondition(lambda self: bool(self.pending))
    @rule(cut=st.integers(min_value=1, max_value=MAX_CHUNK))
    def deliver_some(self, cut: int) -> None:
        chunk, self.pending = self.pending[:cut], self.pending[cut:]
        self._feed(chunk)

    @precondition(lambda self: bool(self.pending))
    @rule()
    def deliver_one_line(self) -> None:
        """Send up to the next CRLF, as a client that waits for each reply does."""
        end = self.pending.find(b"\r\n")
        cut = len(self.pending) if end < 0 else end + 2
        chunk, self.pending = self.pending[:cut], self.pending[cut:]
        while chunk:
            self._feed(chunk[:MAX_CHUNK])
            chunk = chunk[MAX_CHUNK:]

    @precondition(lambda self: bool(self.pending))
    @rule()
    def deliver_all(self) -> None:
        while self.pending:
            chunk, self.pending = self.pending[:MAX_CHUNK], self.pending[MAX_CHUNK:]
            self._feed(chunk)

    @precondition(lambda self: self.handshake_pending)
    @rule()
    def finish_tls_handshake(self) -> None:
        self.handshake_pending = False
        self.client.session.handshakeCompleted()

    @precondition(lambda self: any(not call.deferred.called for call in self.client.deliverer.calls))
    @rule(outcome=OUTCOME)
    def api_answers(self, outcome: Any) -> None:
        call = next(call for call in self.client.deliverer.calls if not call.deferred.called)
        if isinstance(outcome, Delivered) and not self.client.session._closing:
            self.heard_delivered += 1  # The client must hear exactly this 250.
        call.deferred.callback(outcome)
        self._collect()

    @rule(seconds=st.sampled_from([0.1, 1.0, 31.0, 301.0, 601.0]))
    def time_passes(self, seconds: float) -> None:
        self.client.clock.advance(seconds)
        self._collect()

    def _feed(self, chunk: bytes) -> None:
        if self.client.closed:
            return  # A closed connection delivers nothing more.
        self.client.session.dataReceived(chunk)
        self._collect()

    def _collect(self) -> None:
        before = len(self.lines)
        new = self.client.replies()  # Checks the form of every line.
        if self.closed_at is not None:
            assert new == [], f"written after close: {new}"
        self.lines.extend(new)
        if "220 2.0.0 Ready to start TLS" in new:
            assert new[-1] == "220 2.0.0 Ready to start TLS", f"answered inside TLS: {new}"
            session = self.client.session
            # RFC 3207 §4.2: everything learnt before TLS is forgotten.
            assert session._helo is None and session.account is None and session._sender is None
            assert session._buffer == b""
            self.handshake_pending = True
            self.pending = b""  # A real client handshakes next; nothing it queued survives.
        self.data_starts += sum(1 for line in new if line.startswith("354 "))
        if self.client.closed and self.closed_at is None:
            self.closed_at = before

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def buffers_bounded(self) -> None:
        if self.client is None:
            return
        session = self.client.session
        assert len(session._buffer) <= smtp.PAUSE_READING_AT + MAX_CHUNK + MAX_AUTH_LINE
        if session._reader is not None:
            assert len(session._reader._partial) <= MAX_LINE + 3

    @invariant()
    def one_delivery_per_accepted_data(self) -> None:
        if self.client is None:
            return
        deliveries = len(self.client.deliverer.calls)
        assert deliveries <= self.data_starts
        accepted = sum(1 for line in self.lines if line.startswith("250 2.0.0 Ok: prov-1"))
        if self.client.deliverer.outcome is not None:
            assert accepted == deliveries  # Answered at once: every delivery is one 250.
        else:
            assert accepted == self.heard_delivered

    def teardown(self) -> None:
        if self.client is None:
            return
        self.client.clock.advance(4000)
        if not self.client.closed:
            self.client.transport.loseConnection()
        self.client.session.connectionLost(None)
        self.client.clock.advance(4000)
        assert self.client.clock.getDelayedCalls() == []


def test_random_sessions_keep_the_invariants() -> None:
    """Random dialogues, splits, TLS points and API answers never break the session's invariants."""
    run_state_machine_as_test(
        SessionMachine,
        settings=settings(
            max_examples=400,
            stateful_step_count=60,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
