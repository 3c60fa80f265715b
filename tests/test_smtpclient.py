"""The SMTP relay client, driven line by line over a StringTransport with a Clock."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailgate.smtpclient import (
    AUTH,
    CONNECTION_LOST,
    DATA,
    EHLO,
    GREETING,
    MAIL,
    MAX_REPLY_LINES,
    MESSAGE,
    NO_AUTH,
    NO_STARTTLS,
    PROTOCOL_ERROR,
    RCPT,
    STARTTLS,
    TIMEOUT,
    RelayClient,
    SMTPRequest,
    SMTPResponse,
    UpstreamReply,
)

BODY = b"Received: from x\r\nSubject: hi\r\n\r\n.leading dot\r\ncaf\xc3\xa9\r\n"
STUFFED = b"Received: from x\r\nSubject: hi\r\n\r\n..leading dot\r\ncaf\xc3\xa9\r\n.\r\n"
# Throwaway test credentials, not secrets.
USER, PASSWORD = "relay-user", "relay-test-password"


class TLSStringTransport(StringTransport):
    """A StringTransport that records STARTTLS instead of doing it."""

    tls_options: Any = None

    def startTLS(self, options: Any) -> None:
        self.tls_options = options


def request(**overrides: Any) -> SMTPRequest:
    fields: dict[str, Any] = {
        "provider": "relay",
        "message_id": "Q1",
        "sender": "app@example.com",
        "recipients": ("to@example.org", "bcc@example.net"),
        "body": BODY,
    }
    fields.update(overrides)
    return SMTPRequest(**fields)


class Session:
    """One client connected to a scripted server: ``reply`` feeds lines, ``sent`` takes what the client wrote."""

    def __init__(self, req: SMTPRequest | None = None, tls: str = "none", timeout: float = 30) -> None:
        self.clock = Clock()
        self.transport = TLSStringTransport()
        self.client = RelayClient(
            req or request(),
            server="upstream.example:587",
            helo="mailgate.example",
            starttls=object() if tls == "starttls" else None,
            require_tls=tls != "none",
            implicit_tls=tls == "implicit",
            timeout=timeout,
            clock=self.clock,
        )
        self.results: list[SMTPResponse] = []
        self.client.done.addCallback(self.results.append)
        self.client.makeConnection(self.transport)

    def reply(self, *lines: str) -> None:
        self.client.dataReceived(b"".join(line.encode() + b"\r\n" for line in lines))

    def sent(self) -> list[bytes]:
        data = self.transport.value()
        self.transport.clear()
        return data.split(b"\r\n")[:-1] if data else []

    def pump_body(self) -> bytes:
        """Let the body producer run to the end, as a real transport would."""
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        data = self.transport.value()
        self.transport.clear()
        return data

    @property
    def result(self) -> SMTPResponse:
        assert len(self.results) == 1, self.results
        return self.results[0]

    def ready(self, extensions: tuple[str, ...] = ("SIZE 1000000", "8BITMIME")) -> None:
        """Greeting and EHLO answered; the client is about to send MAIL."""
        self.reply("220 upstream.example ESMTP")
        assert self.sent() == [b"EHLO mailgate.example"]
        self.reply("250-upstream.example", *(f"250-{e}" for e in extensions[:-1]), f"250 {extensions[-1]}")


def test_plain_session_sends_envelope_and_stuffed_body() -> None:
    """Every envelope recipient gets an RCPT, SIZE and BODY=8BITMIME follow the EHLO
    keywords, the body is dot-stuffed, and the 250 to the final dot is the result."""
    s = Session()
    s.ready()
    assert s.sent() == [b"MAIL FROM:<app@example.com> SIZE=%d BODY=8BITMIME" % len(BODY)]
    s.reply("250 2.1.0 Ok")
    assert s.sent() == [b"RCPT TO:<to@example.org>"]
    s.reply("250 2.1.5 Ok")
    assert s.sent() == [b"RCPT TO:<bcc@example.net>"]
    s.reply("250 2.1.5 Ok")
    assert s.sent() == [b"DATA"]
    s.reply("354 End data with <CR><LF>.<CR><LF>")
    assert s.pump_body() == STUFFED
    assert s.results == []
    s.reply("250 2.0.0 Ok: queued as 4ABC")
    assert s.result == SMTPResponse(
        "upstream.example:587", MESSAGE, UpstreamReply(250, "2.0.0 Ok: queued as 4ABC"), final_dot_sent=True
    )
    assert s.sent() == [b"QUIT"]


def test_null_sender_and_no_extensions() -> None:
    """The null reverse-path is sent as <>, and without SIZE/8BITMIME no parameters are added."""
    s = Session(request(sender=""))
    s.ready(("PIPELINING",))
    assert s.sent() == [b"MAIL FROM:<>"]


def test_auth_plain_uses_an_empty_authorization_identity() -> None:
    """AUTH PLAIN sends NUL user NUL password (RFC 4616) as the initial response, once."""
    s = Session(request(username=USER, password=PASSWORD))
    s.ready(("AUTH LOGIN PLAIN",))
    token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
    assert s.sent() == [b"AUTH PLAIN " + token]
    s.reply("235 2.7.0 Authentication successful")
    assert s.sent()[0].startswith(b"MAIL FROM:<app@example.com>")


def test_auth_login_answers_both_prompts() -> None:
    """With only LOGIN offered, the username and the password answer the two 334 prompts."""
    s = Session(request(username=USER, password=PASSWORD))
    s.ready(("AUTH LOGIN",))
    assert s.sent() == [b"AUTH LOGIN"]
    s.reply("334 VXNlcm5hbWU6")
    assert s.sent() == [base64.b64encode(USER.encode())]
    s.reply("334 UGFzc3dvcmQ6")
    assert s.sent() == [base64.b64encode(PASSWORD.encode())]
    s.reply("235 2.7.0 Ok")
    assert s.sent()[0].startswith(b"MAIL FROM:")


def test_refused_credentials_end_the_session_at_auth() -> None:
    """A 535 is the result (stage AUTH); the password is not tried twice and the client quits."""
    s = Session(request(username=USER, password=PASSWORD))
    s.ready(("AUTH PLAIN",))
    s.sent()
    s.reply("535 5.7.8 Authentication credentials invalid")
    assert (s.result.stage, s.result.reply) == (AUTH, UpstreamReply(535, "5.7.8 Authentication credentials invalid"))
    assert s.sent() == [b"QUIT"]


def test_no_usable_auth_mechanism() -> None:
    """Credentials but no PLAIN/LOGIN offered: the session ends before MAIL, naming what was offered."""
    s = Session(request(username=USER, password=PASSWORD))
    s.ready(("AUTH CRAM-MD5",))
    assert s.result.problem == NO_AUTH
    assert "CRAM-MD5" in s.result.detail
    assert s.sent() == [b"QUIT"]


def test_starttls_required_but_not_offered() -> None:
    """With tls = starttls and no STARTTLS in EHLO, nothing of the message is sent in clear."""
    s = Session(request(username=USER, password=PASSWORD), tls="starttls")
    s.ready(("AUTH PLAIN", "8BITMIME"))
    assert (s.result.stage, s.result.problem) == (EHLO, NO_STARTTLS)
    assert s.sent() == [b"QUIT"]


def test_starttls_comes_before_auth_and_ehlo_is_repeated() -> None:
    """AUTH offered in clear is not used: STARTTLS first, then a new EHLO, then AUTH."""
    s = Session(request(username=USER, password=PASSWORD), tls="starttls")
    s.ready(("AUTH PLAIN", "STARTTLS"))
    assert s.sent() == [b"STARTTLS"]
    assert s.transport.tls_options is None
    s.reply("220 2.0.0 Ready to start TLS")
    assert s.transport.tls_options is s.client.context
    assert s.sent() == [b"EHLO mailgate.example"]
    s.reply("250-upstream.example", "250 AUTH PLAIN")
    assert s.sent()[0].startswith(b"AUTH PLAIN ")


def test_starttls_refused() -> None:
    """A 454 to STARTTLS is the result at stage STARTTLS."""
    s = Session(tls="starttls")
    s.ready(("STARTTLS",))
    s.sent()
    s.reply("454 4.7.0 TLS not available")
    assert (s.result.stage, s.result.reply) == (STARTTLS, UpstreamReply(454, "4.7.0 TLS not available"))


def test_implicit_tls_needs_no_starttls() -> None:
    """On an implicit-TLS connection the client goes straight to AUTH."""
    s = Session(request(username=USER, password=PASSWORD), tls="implicit")
    s.ready(("AUTH PLAIN",))
    assert s.sent()[0].startswith(b"AUTH PLAIN ")


def test_greeting_refusal() -> None:
    """A 554 greeting is the result at stage greeting."""
    s = Session()
    s.reply("554 5.7.1 No service for you")
    assert (s.result.stage, s.result.reply) == (GREETING, UpstreamReply(554, "5.7.1 No service for you"))


def test_mail_refused() -> None:
    """A 4xx to MAIL is the result at stage MAIL; no RCPT follows."""
    s = Session()
    s.ready()
    s.sent()
    s.reply("451 4.3.0 Try later")
    assert (s.result.stage, s.result.reply) == (MAIL, UpstreamReply(451, "4.3.0 Try later"))
    assert s.sent() == [b"QUIT"]


def test_any_refused_recipient_stops_before_data() -> None:
    """All or nothing: one refused RCPT means no DATA; every refusal is reported."""
    s = Session(request(recipients=("a@example.org", "b@example.org", "c@example.org")))
    s.ready()
    s.sent()
    s.reply("250 Ok")
    s.reply("550 5.1.1 <a@example.org>: User unknown")
    s.reply("250 Ok")
    s.reply("450 4.2.0 <c@example.org>: Mailbox busy")
    assert s.sent() == [b"RCPT TO:<a@example.org>", b"RCPT TO:<b@example.org>", b"RCPT TO:<c@example.org>", b"QUIT"]
    assert s.result.stage == RCPT
    assert s.result.refused == (
        ("a@example.org", UpstreamReply(550, "5.1.1 <a@example.org>: User unknown")),
        ("c@example.org", UpstreamReply(450, "4.2.0 <c@example.org>: Mailbox busy")),
    )


def test_421_to_rcpt_stops_the_recipient_list() -> None:
    """A 421 means the server is closing: the remaining recipients are not tried."""
    s = Session(request(recipients=("a@example.org", "b@example.org")))
    s.ready()
    s.sent()
    s.reply("250 Ok")
    s.reply("421 4.3.2 Shutting down")
    assert s.sent() == [b"RCPT TO:<a@example.org>", b"QUIT"]
    assert s.result.refused == (("a@example.org", UpstreamReply(421, "4.3.2 Shutting down")),)


def _to_data(s: Session) -> None:
    s.ready()
    s.reply("250 Ok", "250 Ok", "250 Ok")
    assert s.sent()[-1] == b"DATA"


def test_data_refused() -> None:
    """A 554 to DATA is the result at stage DATA, with nothing of the body sent."""
    s = Session()
    _to_data(s)
    s.reply("554 5.5.1 No valid recipients")
    assert (s.result.stage, s.result.final_dot_sent) == (DATA, False)
    assert s.sent() == [b"QUIT"]


def test_final_dot_refused() -> None:
    """A 5xx after the final dot is the result at the end-of-data stage."""
    s = Session()
    _to_data(s)
    s.reply("354 go")
    s.pump_body()
    s.reply("552 5.3.4 Message too big")
    assert (s.result.stage, s.result.reply.code, s.result.final_dot_sent) == (MESSAGE, 552, True)


def test_connection_lost_after_the_final_dot_is_flagged() -> None:
    """A lost connection after the final dot was written is reported as such (ambiguous)."""
    s = Session()
    _to_data(s)
    s.reply("354 go")
    s.pump_body()
    s.client.connectionLost(Failure(ConnectionLost("reset")))
    assert (s.result.problem, s.result.stage, s.result.final_dot_sent) == (CONNECTION_LOST, MESSAGE, True)


def test_connection_lost_before_the_final_dot() -> None:
    """A lost connection while waiting for 354 is not ambiguous: nothing was delivered."""
    s = Session()
    _to_data(s)
    s.client.connectionLost(Failure(ConnectionLost("reset")))
    assert (s.result.problem, s.result.stage, s.result.final_dot_sent) == (CONNECTION_LOST, DATA, False)


def test_command_timeout() -> None:
    """No reply within the command timeout ends the exchange and drops the connection."""
    s = Session(timeout=20)
    s.ready()
    s.clock.advance(19)
    assert s.results == []
    s.clock.advance(1)
    assert (s.result.problem, s.result.stage) == (TIMEOUT, MAIL)
    assert s.transport.disconnected


def test_body_progress_resets_the_timeout() -> None:
    """While the body is being written the timeout restarts with each chunk; after the
    last one, the wait for the final reply is one command timeout."""
    big = b"Subject: x\r\n\r\n" + (b"z" * 998 + b"\r\n") * 200  # several 64 KiB chunks
    s = Session(request(body=big), timeout=20)
    _to_data(s)
    s.reply("354 go")
    chunks = 0
    while not s.client._final_dot_sent:
        s.clock.advance(15)
        s.transport.producer.resumeProducing()
        chunks += 1
    assert chunks > 1 and s.results == []
    s.clock.advance(19)
    assert s.results == []
    s.clock.advance(1)
    assert (s.result.problem, s.result.final_dot_sent) == (TIMEOUT, True)


def test_garbage_reply_is_a_protocol_error() -> None:
    """A reply without a numeric code ends the exchange as a protocol error."""
    s = Session()
    s.reply("hello there")
    assert s.result.problem == PROTOCOL_ERROR
    assert s.transport.disconnected


def test_endless_multiline_reply_is_cut_off() -> None:
    """A reply of more than MAX_REPLY_LINES lines is not buffered without bound."""
    s = Session()
    s.reply("220 ok")
    s.sent()
    s.reply(*["250-x"] * (MAX_REPLY_LINES + 5))
    assert s.result.problem == PROTOCOL_ERROR
    assert s.transport.disconnected


def test_credentials_stay_out_of_reprs_and_transcripts() -> None:
    """The request's repr and the client's Twisted transcript never hold the password."""
    req = request(username=USER, password=PASSWORD)
    assert PASSWORD not in repr(req)
    s = Session(req)
    s.ready(("AUTH PLAIN",))
    s.reply("235 ok")
    assert PASSWORD.encode() not in s.client.log.str()
    assert base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()) not in s.client.log.str()


@pytest.mark.parametrize(
    ("reply", "enhanced"),
    [
        (UpstreamReply(550, "5.1.1 User unknown"), "5.1.1"),
        (UpstreamReply(451, "4.7.1 Greylisted"), "4.7.1"),
        (UpstreamReply(550, "4.1.1 wrong class"), None),
        (UpstreamReply(550, "User unknown"), None),
        (UpstreamReply(250, "2.0.0"), "2.0.0"),
        (UpstreamReply(550, "5.1.10x"), None),
    ],
)
def test_enhanced_code_is_read_from_the_reply(reply: UpstreamReply, enhanced: str | None) -> None:
    """The RFC 3463 code counts only when it starts the text and matches the reply class."""
    assert reply.enhanced == enhanced


def test_reply_str_is_one_safe_line() -> None:
    """A multi-line reply with control characters prints as one sanitised line."""
    assert str(UpstreamReply(550, "5.7.1 first\nsecond\x1b[31m")) == "550 5.7.1 first second [31m"


@pytest.mark.parametrize(
    ("response", "message_only"),
    [
        (SMTPResponse("s", RCPT, UpstreamReply(450, "4.2.0 Mailbox busy")), True),
        (SMTPResponse("s", MESSAGE, UpstreamReply(451, "4.7.1 Greylisted")), True),
        (SMTPResponse("s", MAIL, UpstreamReply(452, "Too many messages")), True),
        (SMTPResponse("s", GREETING, UpstreamReply(421, "4.3.2 Busy")), False),
        (SMTPResponse("s", AUTH, UpstreamReply(454, "4.7.0 Try later")), False),
        (SMTPResponse("s", MESSAGE, UpstreamReply(554, "5.7.1 Spam")), False),
        (SMTPResponse("s", DATA, problem=TIMEOUT), False),
    ],
)
def test_which_answers_spare_the_circuit_breaker(response: SMTPResponse, message_only: bool) -> None:
    """A 4xx about one message shows the server up: the circuit breaker ignores it;
    session refusals and connection problems count against the server."""
    assert response.concerns_message_only is message_only
