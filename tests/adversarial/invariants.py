"""The five invariants of SECURITY.md, and a byte-level SMTP client to attack with.

Every adversarial test attacks a real mailgate on loopback (real sockets, real
TLS) with :class:`RawClient`, which sends exactly the bytes it is given and
records every reply line, then calls :meth:`Invariants.check`:

1. no unhandled exception or traceback was logged;
2. exactly the expected number of messages reached the (fake) API;
3. memory stayed bounded: the process's resident set grew by less than
   :data:`MEMORY_BOUND` at any sample taken during the test, and no session
   buffered more than :data:`BUFFER_BOUND` of unanswered input;
4. every reply line was well formed: CRLF-terminated, at most 512 octets
   (RFC 5321 §4.5.3.1.5), ``ddd-``/``ddd `` with an RFC 3463 enhanced code of
   the same class, except the greeting, the EHLO reply and the 334/354
   continuations (RFC 2034 §3; :func:`tests.smtp_helpers.check_reply_lines`);
5. the server is alive: a fresh smtplib session then gets ``220`` and delivers
   exactly one more message.

Clients are blocking sockets, run in a thread (``threads.deferToThread``)
while the reactor serves the gateway in the test's own process.
"""

from __future__ import annotations

import base64
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor, task, threads

from mailgate import smtp
from tests.integration.conftest import PASSWORDS, Gateway, send_with_smtplib
from tests.smtp_helpers import check_reply_lines

MEMORY_BOUND = 50 * 1024 * 1024
BUFFER_BOUND = smtp.PAUSE_READING_AT + 256 * 1024  # Paused reading, plus reads in flight.
MAX_REPLY_LINE = 512
SETTLE_SECONDS = 30.0  # Generous: a loaded CI machine may take a while to close sessions.
ROLES = ("submission", "submissions", "relay")

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: adversarial suite\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)


class Closed(Exception):
    """The server closed the connection."""


def plain_token(user: str, password: str, authzid: str = "") -> bytes:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


class RawClient:
    """One SMTP connection that sends raw bytes and records every reply line.

    ``role`` picks the listener; ``submissions`` wraps the socket in TLS at
    once (RFC 8314).  ``source`` is the client's loopback address.
    """

    def __init__(
        self,
        gateway: Gateway,
        role: str,
        source: str = "127.0.0.1",
        timeout: float = 30.0,
        handshake: bool = True,
    ):
        self.gateway = gateway
        self.role = role
        self.lines: list[bytes] = []  # Every reply line received, CRLF included.
        self._pending = b""
        self.sock: Any = socket.create_connection(
            ("127.0.0.1", gateway.ports[role]), timeout=timeout, source_address=(source, 0)
        )
        self.greeting: list[str] = []
        if role == "submissions" and handshake:
            self.sock = gateway.ssl_context().wrap_socket(self.sock, server_hostname="localhost")
        if handshake:
            self.greeting = self.reply()

    # -- bytes ------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv(self) -> bytes:
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            data = b""
        return data

    def _line(self) -> bytes:
        while b"\r\n" not in self._pending:
            data = self._recv()
            if not data:
                if self._pending:
                    self.lines.append(self._pending)  # An unterminated line: ill-formed.
                    self._pending = b""
                raise Closed()
            self._pending += data
        line, self._pending = self._pending.split(b"\r\n", 1)
        self.lines.append(line + b"\r\n")
        return line

    def reply(self) -> list[str]:
        """The next complete reply (all its lines, without CRLF)."""
        lines = []
        while True:
            line = self._line()
            lines.append(line.decode("ascii", "replace"))
            if line[3:4] != b"-":
                return lines

    def cmd(self, line: bytes | str) -> str:
        """Send one command line and return the last line of its reply."""
        if isinstance(line, str):
            line = line.encode("ascii")
        self.send(line + b"\r\n")
        return self.reply()[-1]

    def replies(self, count: int) -> list[str]:
        """The last lines of the next ``count`` replies."""
        return [self.reply()[-1] for _ in range(count)]

    def read_until_closed(self) -> list[str]:
        """Every reply line until the server closes (the connection must close)."""
        lines: list[str] = []
        try:
            while True:
                lines.append(self._line().decode("ascii", "replace"))
        except Closed:
            return lines

    def closed_by_server(self) -> bool:
        """True if the server has closed the connection (waits up to the socket timeout)."""
        try:
            self.read_until_closed()
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- dialogue ----------------------------------------------------------------

    def ehlo(self, name: str = "client.example") -> list[str]:
        self.send(f"EHLO {name}\r\n".encode())
        lines = self.reply()
        assert lines[-1].startswith("250 "), lines
        return lines

    def starttls(self) -> None:
        assert self.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
        assert self._pending == b"", "bytes after the 220 to STARTTLS"
        self.sock = self.gateway.ssl_context().wrap_socket(self.sock, server_hostname="localhost")

    def login(self, user: str = "alice", password: str | None = None) -> str:
        password = PASSWORDS[user] if password is None else password
        return self.cmd(b"AUTH PLAIN " + plain_token(user, password))

    def prepare(self, user: str = "alice") -> None:
        """Get to where MAIL is accepted: TLS and AUTH where the role needs them
        (the relay listener trusts 127.0.0.1 and is used in plaintext)."""
        self.ehlo()
        if self.role == "submission":
            self.starttls()
            self.ehlo()
        if self.role != "relay":
            assert self.login(user) == "235 2.7.0 Authentication successful"

    def transaction(self, recipients: tuple[str, ...] = ("bob@example.org",), sender: str = "alice@example.com") -> None:
        assert self.cmd(f"MAIL FROM:<{sender}>").startswith("250 "), "MAIL refused"
        for rcpt in recipients:
            assert self.cmd(f"RCPT TO:<{rcpt}>").startswith("250 "), f"RCPT {rcpt} refused"
        assert self.cmd("DATA").startswith("354 ")

    def message(self, body: bytes = MESSAGE, **kwargs: Any) -> str:
        """A whole transaction with a correctly framed body; the reply to the dot."""
        self.transaction(**kwargs)
        self.send(stuff(body) + b".\r\n")
        return self.reply()[-1]

    def quit(self) -> None:
        try:
            self.cmd("QUIT")
        except (Closed, OSError):
            pass
        self.close()


def stuff(body: bytes) -> bytes:
    """Dot-stuff a CRLF body for DATA (RFC 5321 §4.5.2); ends with CRLF.

    Done with two replaces, not line by line: the client shares the server's
    process, and a per-line list would count against the memory invariant."""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def check_reply_form(raw_lines: list[bytes]) -> None:
    """Invariant 4 on the lines one client received."""
    for line in raw_lines:
        assert line.endswith(b"\r\n"), f"reply line not CRLF-terminated: {line!r}"
        assert len(line) <= MAX_REPLY_LINE, f"reply line over 512 octets: {line[:80]!r}..."
        assert b"\r" not in line[:-2] and b"\n" not in line[:-2], f"bare CR/LF in reply: {line!r}"
    check_reply_lines([line[:-2].decode("ascii") for line in raw_lines])


def _rss() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Invariants:
    """Watches one test's gateway; :meth:`check` asserts the five invariants."""

    gateway: Gateway
    logged_errors: Any
    sessions: list[smtp.SMTPSession]
    clients: list[RawClient] = field(default_factory=list)
    baseline_rss: int = 0
    peak_rss: int = 0
    peak_buffer: int = 0
    requests_before: int = 0

    def start(self) -> None:
        self.requests_before = len(self.gateway.api.requests)
        self.baseline_rss = self.peak_rss = _rss()
        self._sampler = task.LoopingCall(self._sample)
        self._sampler.start(0.02)

    def _sample(self) -> None:
        self.peak_rss = max(self.peak_rss, _rss())
        for session in self.sessions:
            self.peak_buffer = max(self.peak_buffer, len(session._buffer))

    def client(self, role: str, **kwargs: Any) -> RawClient:
        """A RawClient whose replies the check will inspect (call from a thread)."""
        client = RawClient(self.gateway, role, **kwargs)
        self.clients.append(client)
        return client

    def attack(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function(*args)`` (blocking socket code) in a thread; a Deferred."""
        return threads.deferToThread(function, *args)

    @property
    def delivered(self) -> int:
        return len(self.gateway.api.requests) - self.requests_before

    async def settle(self) -> None:
        """Wait until every session of the attack has ended, so no delivery is still coming."""
        for client in self.clients:
            client.close()
        for _ in range(int(SETTLE_SECONDS / 0.02)):
            if all(session._connection_lost for session in self.sessions):
                return
            await task.deferLater(reactor, 0.02, lambda: None)
        raise AssertionError("sessions still open after the attack: " + repr([s.peer_ip for s in self.sessions if not s._connection_lost]))

    async def check(self, delivered: int, role: str = "submission", alive_source: str = "127.0.0.1") -> None:
        """Assert the five invariants; ``delivered`` is the exact count expected."""
        await self.settle()
        self._sample()
        self._sampler.stop()
        # 1. No traceback or error was logged.
        assert self.logged_errors.events == [], [e.get("log_format") for e in self.logged_errors.events]
        # 2. Exactly the expected deliveries.
        assert self.delivered == delivered, f"{self.delivered} messages reached the API, expected {delivered}"
        # 3. Bounded memory.
        growth = self.peak_rss - self.baseline_rss
        assert growth < MEMORY_BOUND, f"resident memory grew by {growth / 2**20:.1f} MiB"
        assert self.peak_buffer < BUFFER_BOUND, f"a session buffered {self.peak_buffer} octets"
        for session in self.sessions:
            assert session._spool is None and session._reader is None, "DATA spool left behind"
        # 4. Well-formed replies.
        for client in self.clients:
            check_reply_form(client.lines)
        # 5. The server is alive and still delivers.
        result = await send_with_smtplib(
            self.gateway,
            role,
            "PLAIN",
            sender="alice@example.com",
            recipients=["carol@example.org"],
            message=MESSAGE,
            source=alive_source,
        )
        assert result.code == 250, (result.code, result.text)
        assert self.delivered == delivered + 1
