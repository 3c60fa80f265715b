"""Shared helpers for driving :class:`mailgate.smtp.SMTPSession` in memory.

Everything runs over ``StringTransport`` with a ``Clock``: no reactor, no
sockets.  :func:`connect` builds a session the way ``build.py`` does (policy,
cred portal over a :class:`MemoryAccountStore`, a fake deliverer, the real
message parser) and returns a :class:`Client` whose :meth:`Client.send` feeds
bytes and returns the reply lines written since the previous call.

Every reply line that passes through a Client is checked for form
(``\\d{3}[ -]text``) and, except where RFC 2034 §3 exempts it (the greeting and
the replies to EHLO/HELO) or the reply has no status semantics (334, 354),
for an RFC 3463 enhanced status code whose class matches the basic code.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import re
from dataclasses import dataclass
from ipaddress import ip_network
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet import address, defer
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from zope.interface import implementer

from mailgate.config import LimitsConfig
from mailgate.accounts.account import Account
from mailgate.accounts.memory import MemoryAccountStore
from mailgate.auth import AccountRealm, AccountStoreChecker
from mailgate.interfaces import IDeliverer
from mailgate.message import parse_message
from mailgate.outcome import Delivered
from mailgate.smtp import SessionPolicy, SMTPSession

HOSTNAME = "mx.test"
TLS_CONTEXT = object()  # A sentinel standing in for an IOpenSSLServerConnectionCreator.

ALICE = Account(name="alice")
BOB = Account(
    name="bob",
    allowed_senders=("bob@example.com", "@bob.test"),
    max_recipients=5,
)
CAROL = Account(name="carol", max_recipients=60, max_message_size=2000)
TRUSTED = Account(name="trusted-networks")
PASSWORDS = {"alice": "s3cret", "bob": "hunter2", "carol": "pw-carol", "dave@example.com": "pw d"}
ACCOUNTS = {
    "alice": ("s3cret", ALICE),
    "bob": ("hunter2", BOB),
    "carol": ("pw-carol", CAROL),
    "dave@example.com": ("pw d", Account(name="dave")),
}

_REPLY_LINE = re.compile(rb"\A(\d{3})([ -])(.*)\Z", re.DOTALL)
_ENHANCED = re.compile(r"\A([245])\.\d{1,3}\.\d{1,3}(?: |\Z)")

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)


# -- fakes ----------------------------------------------------------------------


@implementer(ITLSTransport)
class TLSStringTransport(StringTransportWithDisconnection):
    """A StringTransport that can "start TLS": it records the call and flips a flag."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tls_started = False
        self.tls_contexts: list[Any] = []

    def startTLS(self, ctx: Any, normal: bool = True) -> None:
        self.tls_started = True
        self.tls_contexts.append(ctx)

    # ITCPTransport odds and ends that ITLSTransport inherits.
    def loseWriteConnection(self) -> None:  # pragma: no cover - not used
        self.loseConnection()

    def getTcpNoDelay(self) -> bool:  # pragma: no cover - not used
        return False

    def setTcpNoDelay(self, enabled: bool) -> None:  # pragma: no cover - not used
        pass

    def getTcpKeepAlive(self) -> bool:  # pragma: no cover - not used
        return False

    def setTcpKeepAlive(self, enabled: bool) -> None:  # pragma: no cover - not used
        pass


@dataclass
class DeliveryCall:
    email: Any
    account: Account
    queue_id: str
    deferred: defer.Deferred[Any]


DEFAULT_OUTCOME = Delivered("fake", "prov-1")


@implementer(IDeliverer)
class FakeDeliverer:
    """Records each ``deliver`` call; answers with ``outcome`` at once, or never
    (``outcome=None``) so the test fires ``calls[i].deferred`` itself."""

    def __init__(self, outcome: Any = DEFAULT_OUTCOME) -> None:
        self.outcome = outcome
        self.calls: list[DeliveryCall] = []
        self.prepared: list[tuple[str, bytes]] = []  # (queue id, raw) per prepare call
        self.released: list[str] = []

    def prepare(self, queue_id: str, raw: bytes, sender: str, recipients: Any, account: Any) -> None:
        self.prepared.append((queue_id, raw))

    def release(self, queue_id: str) -> None:
        self.released.append(queue_id)

    def deliver(self, email: Any, account: Any, queue_id: str) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append(DeliveryCall(email, account, queue_id, d))
        if self.outcome is not None:
            d.callback(self.outcome)
        return d


class BrokenStore(MemoryAccountStore):
    """An account store whose backend is down: every check fails with RuntimeError."""

    def authenticate_password(self, username: str, password: str) -> Any:
        return defer.fail(RuntimeError("store backend unreachable: secret-detail"))

    def authenticate_cram_md5(self, username: str, challenge: bytes, digest: str) -> Any:
        return defer.fail(RuntimeError("store backend unreachable: secret-detail"))


# -- the client -------------------------------------------------------------------


def check_reply_lines(lines: list[str]) -> None:
    """Assert RFC 5321 §4.2 form and RFC 3463 codes on a batch of reply lines."""
    group: list[str] = []
    for line in lines:
        group.append(line)
        if line[3:4] == " ":
            _check_reply(group)
            group = []
    assert not group, f"unterminated multi-line reply: {group!r}"


def _check_reply(group: list[str]) -> None:
    code = group[0][:3]
    for line in group:
        assert _REPLY_LINE.match(line.encode("ascii")), line
        assert line[:3] == code, group
    first = group[0]
    exempt = (
        code in ("334", "354")
        or (code == "220" and first.endswith("ESMTP mailgate"))  # the greeting
        or (code == "250" and " greets " in first)  # EHLO / HELO
    )
    if exempt:
        return
    for line in group:
        match = _ENHANCED.match(line[4:])
        assert match, f"reply without an enhanced status code: {line!r}"
        assert match.group(1) == code[0], f"enhanced class does not match: {line!r}"


class Client:
    """Feeds bytes to one session and collects the reply lines it writes."""

    def __init__(
        self, session: SMTPSession, transport: Any, clock: Clock, deliverer: FakeDeliverer
    ):
        self.session = session
        self.transport = transport
        self.clock = clock
        self.deliverer = deliverer

    def replies(self) -> list[str]:
        """Reply lines written since the previous call (without CRLF)."""
        data = self.transport.value()
        self.transport.clear()
        if not data:
            return []
        assert data.endswith(b"\r\n"), data
        lines = [line.decode("ascii") for line in data[:-2].split(b"\r\n")]
        check_reply_lines(lines)
        return lines

    def send(self, data: bytes | str) -> list[str]:
        if isinstance(data, str):
            data = data.encode("ascii")
        self.session.dataReceived(data)
        return self.replies()

    def cmd(self, line: bytes | str) -> list[str]:
        """Send one command line (CRLF appended) and return the reply lines."""
        if isinstance(line, str):
            line = line.encode("ascii")
        return self.send(line + b"\r\n")

    def code(self, line: bytes | str) -> str:
        """Send one command and return the last reply line, e.g. ``"250 2.1.0 Sender ok"``."""
        lines = self.cmd(line)
        assert lines, f"no reply to {line!r}"
        return lines[-1]

    @property
    def closed(self) -> bool:
        return not self.transport.connected or bool(self.transport.disconnecting)

    # Conveniences for the common dialogue.

    def ehlo(self, name: str = "client.test") -> list[str]:
        lines = self.cmd(f"EHLO {name}")
        assert lines[-1].startswith("250 "), lines
        return lines

    def extensions(self, name: str = "client.test") -> list[str]:
        return [line[4:] for line in self.ehlo(name)[1:]]

    def starttls(self) -> None:
        assert self.code("STARTTLS") == "220 2.0.0 Ready to start TLS"
        assert self.transport.tls_started
        self.session.handshakeCompleted()

    def login(self, user: str = "alice", password: str | None = None) -> None:
        password = PASSWORDS[user] if password is None else password
        token = plain(user, password)
        assert self.code(b"AUTH PLAIN " + token) == "235 2.7.0 Authentication successful"

    def transaction(
        self, sender: str = "alice@example.com", recipients: tuple[str, ...] = ("bob@example.net",)
    ) -> None:
        assert self.code(f"MAIL FROM:<{sender}>").startswith("250 2.1.0")
        for rcpt in recipients:
            assert self.code(f"RCPT TO:<{rcpt}>").startswith("250 2.1.5")
        assert self.code("DATA").startswith("354 ")

    def message(self, body: bytes = MESSAGE, **kwargs: Any) -> list[str]:
        """A whole transaction; returns the reply lines to the final dot."""
        self.transaction(**kwargs)
        return self.send(stuff(body) + b".\r\n")


def stuff(body: bytes) -> bytes:
    """Dot-stuff a CRLF message for DATA (RFC 5321 §4.5.2)."""
    out = []
    for line in body.split(b"\r\n"):
        out.append(b"." + line if line.startswith(b".") else line)
    return b"\r\n".join(out)


def plain(user: str, password: str, authzid: str = "") -> bytes:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


def b64(data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data)


def cram_response(user: str, password: str, challenge: bytes) -> bytes:
    digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
    return base64.b64encode(f"{user} {digest}".encode())


def make_policy(role: str = "submission", **overrides: Any) -> SessionPolicy:
    """A policy for ``role``; overrides name SessionPolicy or LimitsConfig fields."""
    limit_names = {f.name for f in dataclasses.fields(LimitsConfig)}
    limits = {k: overrides.pop(k) for k in list(overrides) if k in limit_names}
    values: dict[str, Any] = {"role": role, "hostname": HOSTNAME, "tls": TLS_CONTEXT}
    values.update(overrides)
    return SessionPolicy(limits=LimitsConfig(**limits), **values)


def connect(
    role: str = "submission",
    *,
    peer: str = "192.0.2.10",
    ipv6: bool = False,
    tls_transport: bool = True,
    store: Any = None,
    deliverer: FakeDeliverer | None = None,
    trusted_account: Account | None = None,
    parse: Any = parse_message,
    clock: Clock | None = None,
    message_rate: Any = None,
    admission: Any = None,
    greeting: str | None = None,
    **policy: Any,
) -> Client:
    """Open a session (greeting consumed and checked) and return its Client.

    ``admission`` shares a :class:`mailgate.admission.Admission` between sessions;
    ``greeting`` is the expected first reply when it is not the usual 220."""
    clock = clock or Clock()
    deliverer = deliverer or FakeDeliverer()
    store = store if store is not None else MemoryAccountStore(ACCOUNTS)
    portal = Portal(AccountRealm(), [AccountStoreChecker(store)])
    session = SMTPSession(
        make_policy(role, **policy), portal, deliverer, clock, parse, trusted_account, message_rate,
        admission=admission,
    )
    peer_address = (
        address.IPv6Address("TCP", peer, 40000) if ipv6 else address.IPv4Address("TCP", peer, 40000)
    )
    transport_class = TLSStringTransport if tls_transport else StringTransportWithDisconnection
    transport = transport_class(peerAddress=peer_address)
    transport.protocol = session
    session.makeConnection(transport)
    client = Client(session, transport, clock, deliverer)
    assert client.replies() == [greeting or f"220 {HOSTNAME} ESMTP mailgate"]
    return client


def tls_client(role: str = "submissions", **kwargs: Any) -> Client:
    """A session under TLS: implicit on submissions, else after STARTTLS (EHLO not yet sent)."""
    client = connect(role, **kwargs)
    if role == "submissions":
        client.session.handshakeCompleted()
    else:
        client.ehlo()
        client.starttls()
    return client


def authed_client(user: str = "alice", role: str = "submissions", **kwargs: Any) -> Client:
    """A TLS session after EHLO and a successful AUTH PLAIN."""
    client = tls_client(role, **kwargs)
    client.ehlo()
    client.login(user)
    return client


def relay_client(**kwargs: Any) -> Client:
    """A relay session from a trusted network (127.0.0.0/8) after EHLO."""
    kwargs.setdefault("peer", "127.0.0.1")
    client = connect(
        "relay",
        trusted_networks=(ip_network("127.0.0.0/8"),),
        trusted_account=TRUSTED,
        **kwargs,
    )
    client.ehlo()
    return client
