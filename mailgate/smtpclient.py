"""Relaying one message to an upstream SMTP server: the transport of the ``smtp`` provider.

The ``smtp`` adapter (:mod:`mailgate.providers.smtp`) builds an
:class:`SMTPRequest`; :class:`SMTPTransport` carries it over one connection
with :class:`RelayClient`, a subclass of twisted.mail's ``ESMTPClient``, and
always answers with an :class:`SMTPResponse` that says how far the exchange
got and what the server replied.  The adapter turns that into an outcome; the
transport decides nothing about delivery, exactly like the HTTP transport.

What the subclass changes in Twisted's client, and why:

* TLS is never optional unless configured so: with ``starttls`` the session
  stops if the server does not offer STARTTLS (RFC 3207), and the certificate
  is checked against the configured host with service-identity (RFC 6125)
  before any command after STARTTLS is sent.  With ``implicit`` the
  connection is TLS from the first byte (RFC 8314 §3).
* AUTH is PLAIN (RFC 4616, empty authorization identity, one attempt) or
  LOGIN, only after TLS; no session transcript is kept (Twisted's would hold
  the credentials).
* Envelope addresses are sent as given, not re-parsed with
  ``email.utils.parseaddr`` (which rewrites quoted local parts).
* All or nothing: when the server refuses any recipient, DATA is not sent.
  mailgate answers the client once for the whole message, so delivering to
  the accepted recipients would either lose the refused ones silently (a 250)
  or send the accepted ones a duplicate when the client retries (a 4xx/5xx).
* The body is dot-stuffed as a whole (:func:`mailgate.framing.dot_stuff`):
  Twisted stuffs per chunk and misses a dot that starts a chunk.
* The transport records whether the final dot was sent: after it, a lost
  connection or a missing reply is ambiguous (the server may have accepted the
  message), before it the message was certainly not delivered.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionDone, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.protocol import connectionDone
from twisted.mail.smtp import ESMTPClient
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate.framing import dot_stuff
from mailgate.interfaces import ITransport
from mailgate.replies import sanitise_text
from mailgate.tls import client_tls_options

TLS_MODES = ("starttls", "implicit", "none")

# How far the exchange got: the command whose reply (or lack of one) ended it.
CONNECT = "connect"
GREETING = "greeting"
EHLO = "EHLO"
STARTTLS = "STARTTLS"
AUTH = "AUTH"
MAIL = "MAIL"
RCPT = "RCPT"
DATA = "DATA"
MESSAGE = "end of data"  # the reply to the final dot
SESSION_STAGES = (CONNECT, GREETING, EHLO, STARTTLS)

# Why an exchange ended without a deciding reply.
UNREACHABLE = "unreachable"
TLS_FAILED = "tls-failed"
NO_STARTTLS = "no-starttls"
NO_AUTH = "no-auth"
TIMEOUT = "timeout"
CONNECTION_LOST = "connection-lost"
PROTOCOL_ERROR = "protocol-error"
INCOMPLETE_CREDENTIALS = "incomplete-credentials"

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_EIGHT_BIT = re.compile(rb"[\x80-\xff]")
_SUCCESS = (250, 251)
# A reply of more lines than this is not an SMTP server talking (RFC 5321 §4.2).
MAX_REPLY_LINES = 100


@dataclass(frozen=True)
class SMTPRequest:
    """One message for the upstream server: envelope, raw MIME, optional AUTH login."""

    provider: str
    message_id: str  # mailgate's queue id: the fallback message id
    sender: str  # "" for the null reverse-path
    recipients: tuple[str, ...]
    body: bytes = field(repr=False)  # raw MIME with CRLF line ends, not dot-stuffed
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class UpstreamReply:
    """A server reply: the code and its text (lines joined by ``\\n``, enhanced code kept)."""

    code: int
    text: str

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 code at the start of the text, if it matches the reply's class."""
        match = _ENHANCED.match(self.text)
        if match and match.group(1) == str(self.code)[0]:
            return match.group()
        return None

    def __str__(self) -> str:
        return sanitise_text(f"{self.code} {' '.join(self.text.splitlines())}")


@dataclass(frozen=True)
class SMTPResponse:
    """How an exchange ended: the deciding reply, or the problem that ended it without one."""

    server: str  # "host:port", for reasons a human reads
    stage: str
    reply: UpstreamReply | None = None
    refused: tuple[tuple[str, UpstreamReply], ...] = ()  # RCPTs the server did not accept
    problem: str | None = None
    detail: str = ""
    final_dot_sent: bool = False

    @property
    def concerns_message_only(self) -> bool:
        """A 4xx to MAIL, RCPT, DATA or the final dot: the server is up and defers
        this message (greylisting, a busy mailbox, a sender quota); the
        dispatcher's circuit breaker does not count it against the server."""
        return (
            self.problem is None
            and self.reply is not None
            and self.stage not in SESSION_STAGES + (AUTH,)
            and 400 <= self.reply.code < 500
        )


class RelayClient(ESMTPClient):
    """Sends one :class:`SMTPRequest` and fires :attr:`done` with an :class:`SMTPResponse`.

    ``starttls`` holds the client TLS options for STARTTLS (None for implicit
    TLS and for plain text); ``require_tls`` refuses to go on without TLS.
    ``clock`` provides ``callLater`` for the command timeout.
    """

    debug = False  # Twisted's session transcript would hold the AUTH exchange.
    heloFallback = False  # Twisted's HELO fallback loops on a refused HELO.

    def __init__(
        self,
        request: SMTPRequest,
        *,
        server: str,
        helo: str,
        starttls: Any,
        require_tls: bool,
        implicit_tls: bool,
        timeout: float,
        clock: Any,
    ) -> None:
        ESMTPClient.__init__(self, None, starttls, helo.encode("ascii"))
        self.request = request
        self.server = server
        self.requireTransportSecurity = require_tls
        self.requireAuthentication = request.username is not None
        self.timeout = timeout
        self.done: defer.Deferred[SMTPResponse] = defer.Deferred()
        self._implicit_tls = implicit_tls
        self._clock = clock
        self._stage = CONNECT
        self._extensions: dict[bytes, bytes | None] = {}
        self._pending: list[str] = []
        self._current: str | None = None
        self._refused: list[tuple[str, UpstreamReply]] = []
        self._payload = b""
        self._payload_sent = 0
        self._final_dot_sent = False
        self._result: SMTPResponse | None = None

    # -- plumbing ---------------------------------------------------------------

    def callLater(self, period: float, func: Callable[[], None]) -> Any:  # TimeoutMixin
        return self._clock.callLater(period, func)

    def connectionMade(self) -> None:
        ESMTPClient.connectionMade(self)
        if self._implicit_tls:
            self._tlsMode = True  # TLSMemoryBIOProtocol does not declare ISSLTransport.
        self._stage = GREETING

    def lineReceived(self, line: bytes) -> Any:
        if len(self.resp) >= MAX_REPLY_LINES:
            self._end(problem=PROTOCOL_ERROR, detail=f"reply of more than {MAX_REPLY_LINES} lines")
            self.transport.abortConnection()
            return None
        return ESMTPClient.lineReceived(self, line)

    def sendError(self, exc: Exception) -> None:
        """Twisted's error path (a reply without a code, mostly): end and drop the connection."""
        self._end(problem=PROTOCOL_ERROR, detail=_exception_text(exc))
        self.transport.abortConnection()

    def timeoutConnection(self) -> None:
        self._end(problem=TIMEOUT, detail=f"no reply within {self.timeout:g} s")
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        ESMTPClient.connectionLost(self, reason)
        if reason.check(SSL.Error, VerificationError):
            self._end(problem=TLS_FAILED, detail=_tls_failure_text(reason.value))
        else:
            self._end(problem=CONNECTION_LOST, detail=_exception_text(reason.value))

    def _end(self, **outcome: Any) -> None:
        """Record how the exchange ended; only the first ending counts."""
        if self._result is not None:
            return
        self.setTimeout(None)
        self._result = SMTPResponse(
            server=self.server,
            stage=self._stage,
            refused=tuple(self._refused),
            final_dot_sent=self._final_dot_sent,
            **outcome,
        )
        self.done.callback(self._result)

    def _replied(self, code: int, resp: bytes) -> None:
        """The reply that decides the exchange: record it and say goodbye."""
        self._end(reply=UpstreamReply(code, resp.decode("utf-8", "replace")))
        self._quit()

    def _quit(self) -> None:
        self._expected = range(1000)
        self._okresponse = self._failresponse = self._close
        self.setTimeout(self.timeout)
        self.sendLine(b"QUIT")

    def _close(self, code: int, resp: bytes) -> None:
        self.transport.loseConnection()

    def _expect(self, codes: Iterable[int], ok: Callable[[int, bytes], Any]) -> None:
        self._expected = list(codes)
        self._okresponse = ok
        self._failresponse = self._replied

    # -- session: greeting, EHLO, STARTTLS --------------------------------------

    def smtpConnectionFailed(self, code: int, resp: bytes) -> None:
        self._replied(code, resp)

    def esmtpState_ehlo(self, code: int, resp: bytes) -> None:
        self._stage = EHLO
        ESMTPClient.esmtpState_ehlo(self, code, resp)

    def esmtpEHLORequired(self, code: int = -1, resp: bytes | None = None) -> None:
        self._replied(code, resp or b"")

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        extensions: dict[bytes, bytes | None] = {}
        for line in resp.splitlines()[1:]:  # the first line is the greeting
            keyword, _, value = line.strip().partition(b" ")
            extensions[keyword.upper()] = value or None
        self._extensions = extensions
        self.tryTLS(code, resp, extensions)

    def tryTLS(self, code: int, resp: bytes, items: dict[bytes, bytes | None]) -> None:
        if not self._tlsMode and self.context is not None and b"STARTTLS" in items:
            self._stage = STARTTLS
        ESMTPClient.tryTLS(self, code, resp, items)

    def esmtpTLSRequired(self, code: int = -1, resp: bytes | None = None) -> None:
        self._end(
            problem=NO_STARTTLS,
            detail="the server does not offer STARTTLS, and mailgate does not send in clear "
            '(tls = "starttls")',
        )
        self._quit()

    def esmtpTLSFailed(self, code: int = -1, resp: bytes | None = None) -> None:
        self._replied(code, resp or b"")

    def esmtpState_starttls(self, code: int, resp: bytes) -> None:
        # Twisted's version logs the error and then sends EHLO anyway, in clear.
        try:
            self.transport.startTLS(self.context)
        except Exception as e:  # noqa: BLE001 - OpenSSL refused to set up the context
            self._end(problem=TLS_FAILED, detail=f"cannot start TLS: {_exception_text(e)}")
            self.transport.abortConnection()
            return
        self._tlsMode = True
        # The stage stays STARTTLS through this EHLO: its reply is the first
        # thing that needs the handshake (and the certificate check) done.
        ESMTPClient.esmtpState_ehlo(self, code, resp)

    # -- AUTH (RFC 4954) ----------------------------------------------------------

    def authenticate(self, code: int, resp: bytes, items: dict[bytes, bytes | None]) -> None:
        request = self.request
        if request.username is None or request.password is None:
            self.smtpState_from(code, resp)
            return
        offered = set((items.get(b"AUTH") or b"").upper().split())
        user = request.username.encode("utf-8")
        secret = request.password.encode("utf-8")
        self._stage = AUTH
        if b"PLAIN" in offered:
            # RFC 4616 §2: [authzid] NUL authcid NUL passwd, with the initial response.
            token = base64.b64encode(b"\0" + user + b"\0" + secret)
            self._expect([235], self.smtpState_from)
            self.sendLine(b"AUTH PLAIN " + token)
        elif b"LOGIN" in offered:
            # The LOGIN mechanism (draft-murchison-sasl-login): two 334 prompts,
            # answered with the username and then the password.
            def send_password(code: int, resp: bytes) -> None:
                self._expect([235], self.smtpState_from)
                self.sendLine(base64.b64encode(secret))

            def send_username(code: int, resp: bytes) -> None:
                self._expect([334], send_password)
                self.sendLine(base64.b64encode(user))

            self._expect([334], send_username)
            self.sendLine(b"AUTH LOGIN")
        else:
            names = b" ".join(sorted(offered)).decode("ascii", "replace") or "none"
            self._end(problem=NO_AUTH, detail=f"the server offers no AUTH PLAIN or LOGIN (offered: {names})")
            self._quit()

    # -- the transaction: MAIL, RCPT, DATA -----------------------------------------

    def smtpState_from(self, code: int, resp: bytes) -> None:
        request = self.request
        self._stage = MAIL
        self._payload = dot_stuff(request.body)
        line = b"MAIL FROM:<" + request.sender.encode("ascii") + b">"
        if b"SIZE" in self._extensions:
            line += b" SIZE=%d" % len(request.body)  # RFC 1870
        if b"8BITMIME" in self._extensions and _EIGHT_BIT.search(request.body):
            line += b" BODY=8BITMIME"  # RFC 6152
        self._pending = list(request.recipients)
        self._expect(_SUCCESS, self._next_recipient)
        self.sendLine(line)

    def _next_recipient(self, code: int, resp: bytes) -> None:
        self._stage = RCPT
        if not self._pending:
            if self._refused:
                # All or nothing (module docstring): the deciding reply is a refusal.
                self._end(reply=self._refused[0][1])
                self._quit()
                return
            self._stage = DATA
            self._expect([354], self._send_body)
            self.sendLine(b"DATA")
            return
        self._current = self._pending.pop(0)
        self._expected = list(_SUCCESS)
        self._okresponse = self._next_recipient
        self._failresponse = self._recipient_refused
        self.sendLine(b"RCPT TO:<" + self._current.encode("ascii") + b">")

    def _recipient_refused(self, code: int, resp: bytes) -> None:
        assert self._current is not None
        self._refused.append((self._current, UpstreamReply(code, resp.decode("utf-8", "replace"))))
        if code == 421:  # RFC 5321 §3.8: the server is closing the session.
            self._pending.clear()
        self._next_recipient(code, resp)

    def _send_body(self, code: int, resp: bytes) -> None:
        self._expect(_SUCCESS, self._accepted)
        sending = FileSender().beginFileTransfer(BytesIO(self._payload), self.transport, self._sending)
        sending.addErrback(self._body_interrupted)

    def _sending(self, chunk: bytes) -> bytes:
        self.resetTimeout()  # progress, even though the server says nothing yet
        self._payload_sent += len(chunk)
        if self._payload_sent == len(self._payload):
            # The last chunk carries the final dot: from now on the server may
            # have the message, whatever happens to the connection.
            self._stage = MESSAGE
            self._final_dot_sent = True
        return chunk

    def _body_interrupted(self, failure: Failure) -> None:
        self._end(problem=CONNECTION_LOST, detail="connection lost while sending the message")

    def _accepted(self, code: int, resp: bytes) -> None:
        self._replied(code, resp)


def _exception_text(error: BaseException) -> str:
    if isinstance(error, ConnectionDone):
        return "the server closed the connection"
    text = " ".join(str(part) for part in getattr(error, "args", ()) if part) or type(error).__name__
    return sanitise_text(text, 200)


def _tls_failure_text(error: BaseException) -> str:
    if isinstance(error, VerificationError):
        return "the server's certificate is not valid for this host name"
    reasons = []
    for entry in error.args[0] if error.args and isinstance(error.args[0], list) else ():
        if isinstance(entry, tuple) and entry:
            reasons.append(str(entry[-1]))
    return "TLS handshake failed: " + sanitise_text(", ".join(reasons) or str(error), 200)


def _connect_failure_text(failure: Failure, timeout: float) -> str:
    if failure.check(ConnectTimeoutError):
        return f"no connection within {timeout:g} s"
    if failure.check(DNSLookupError):
        return "the host name does not resolve"
    return _exception_text(failure.value)


@implementer(ITransport)
class SMTPTransport:
    """Delivers :class:`SMTPRequest` objects to one upstream server, one connection each.

    ``tls`` is one of :data:`TLS_MODES`; ``trust_root`` replaces the system's
    CAs (a private CA); ``connect_timeout`` bounds the TCP connection and
    ``command_timeout`` each wait for a reply (RFC 5321 §4.5.3.2).
    ``endpoint`` may replace the TCP endpoint (tests).
    """

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        tls: str,
        helo: str,
        connect_timeout: float,
        command_timeout: float,
        trust_root: Any = None,
        endpoint: Any = None,
    ) -> None:
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {TLS_MODES}")
        self.reactor = reactor
        self.host = host
        self.port = port
        self.tls = tls
        self.helo = helo
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.server = f"{host}:{port}"
        self._tls_options = client_tls_options(host, trust_root) if tls != "none" else None
        self._endpoint = endpoint

    def send(self, request: SMTPRequest) -> defer.Deferred[SMTPResponse]:
        if (request.username is None) != (request.password is None):
            return defer.succeed(
                SMTPResponse(
                    self.server,
                    CONNECT,
                    problem=INCOMPLETE_CREDENTIALS,
                    detail="username and password must be set together",
                )
            )
        endpoint = self._endpoint or HostnameEndpoint(
            self.reactor, self.host, self.port, timeout=self.connect_timeout
        )
        if self.tls == "implicit":
            endpoint = wrapClientTLS(self._tls_options, endpoint)
        client = RelayClient(
            request,
            server=self.server,
            helo=self.helo,
            starttls=self._tls_options if self.tls == "starttls" else None,
            require_tls=self.tls != "none",
            implicit_tls=self.tls == "implicit",
            timeout=self.command_timeout,
            clock=self.reactor,
        )

        def unreachable(failure: Failure) -> SMTPResponse:
            return SMTPResponse(
                self.server,
                CONNECT,
                problem=UNREACHABLE,
                detail=_connect_failure_text(failure, self.connect_timeout),
            )

        connecting = connectProtocol(endpoint, client)
        connecting.addCallbacks(lambda _: client.done, unreachable)
        return connecting
