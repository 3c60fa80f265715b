"""``mailgate send-test``: send one message through the running gateway, like a
provider dashboard's "test connection".

It connects to a configured listener the way a client would: on the listener's
own address (a wildcard address is reached over loopback), with implicit TLS on
a ``submissions`` listener and STARTTLS on the others (RFC 8314, RFC 3207), a
PROXY protocol v1 line first when the listener expects one (``haproxy:``), and
AUTH when a user is given (RFC 4954).  The server's certificate is verified
for ``[server] hostname`` against the system's CAs and the configured
certificate itself, so a self-signed or development certificate passes while a
wrong one does not.

The final reply is printed (``250 2.0.0 Ok: <provider message id>``); the exit
status is 0 for a 2xx reply, 1 for any other reply.  ``--show-dialogue``
prints the SMTP conversation first, with the AUTH exchange redacted and the
message itself summarised.
"""

from __future__ import annotations

import email.utils
import smtplib
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from mailgate.config import Config, ListenerConfig
from mailgate.tls import DEV_CERT_NAME

WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "::0": "::1"}


class SendTestError(Exception):
    """Cannot even try (no such listener, unreachable, TLS refused): one line, exit 2."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    proxy_protocol: bool = False


def _split_endpoint(description: str) -> tuple[list[str], dict[str, str]]:
    """Twisted endpoint syntax: ``:``-separated, ``\\:`` escapes a colon, ``key=value`` keywords."""
    parts = description.replace("\\:", "\0").split(":")
    args, kwargs = [], {}
    for part in (p.replace("\0", ":") for p in parts):
        key, eq, value = part.partition("=")
        if eq:
            kwargs[key] = value
        else:
            args.append(part)
    return args, kwargs


def listener_target(listener: ListenerConfig) -> Target:
    """Where a client on this machine reaches ``listener``; SendTestError when the
    endpoint does not say (systemd sockets, UNIX sockets...)."""
    description, proxy = listener.endpoint, False
    if description.startswith("haproxy:"):
        description, proxy = description[len("haproxy:") :], True
    args, kwargs = _split_endpoint(description)
    kind = args[0] if args else ""
    if kind.isdigit():  # "587" is short for "tcp:587"
        kind, args = "tcp", ["tcp", *args]
    if kind not in ("tcp", "tcp6"):
        raise SendTestError(
            f"cannot tell where {listener.endpoint!r} listens; give --server HOST:PORT"
        )
    port = kwargs.get("port") or (args[1] if len(args) > 1 else "")
    interface = kwargs.get("interface") or (args[2] if len(args) > 2 else "")
    if not port.isdigit() or int(port) == 0:
        raise SendTestError(f"{listener.endpoint!r} has no fixed port; give --server HOST:PORT")
    host = WILDCARDS.get(interface, interface) if interface or kind == "tcp" else "::1"
    return Target(host, int(port), proxy)


def parse_server(text: str) -> Target:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise SendTestError(f"--server {text!r}: expected HOST:PORT")
    return Target(host, int(port))


def tls_context(config: Config) -> ssl.SSLContext:
    """Verify the server for ``[server] hostname``: system CAs plus the gateway's own
    certificate (partial chains allowed, so a self-signed or dev certificate is trusted)."""
    context = ssl.create_default_context()
    own = config.tls.certificate or config.server.state_dir / "tls" / DEV_CERT_NAME
    try:
        context.load_verify_locations(cafile=str(own))
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    except (OSError, ssl.SSLError):
        pass  # Unreadable here: the system's CAs alone decide.
    return context


class Dialogue:
    """The SMTP conversation as text: what the client sent after ``AUTH`` (until the
    server's verdict) is redacted, and the message itself is summarised."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._in_auth = self._in_data = False

    def note(self, text: str) -> None:
        self.lines.append(f"   ({text})")

    def client(self, data: bytes | str) -> None:
        text = data.decode("ascii", "replace") if isinstance(data, bytes) else data
        if self._in_data:
            self.lines.append(f"C: <message, {len(data)} octets>")
        elif self._in_auth:
            self.lines.append("C: <redacted>")
        elif text.upper().startswith("AUTH "):
            words = text.split()
            self.lines.append(" ".join(["C:", *words[:2], *(["<redacted>"] if len(words) > 2 else [])]))
            self._in_auth = True
        else:
            self.lines.append(f"C: {text.rstrip()}")

    def server(self, code: int, message: bytes) -> None:
        texts = message.decode("utf-8", "replace").split("\n")
        for index, text in enumerate(texts):
            self.lines.append(f"S: {code}{' ' if index == len(texts) - 1 else '-'}{text}")
        self._in_data = code == 354
        if code != 334:
            self._in_auth = False


class DialogueSMTP(smtplib.SMTP):
    """smtplib that records the conversation, redacting AUTH, and can speak PROXY v1
    and implicit TLS from the first byte."""

    def __init__(self, tls: ssl.SSLContext, tls_name: str, implicit_tls: bool, proxy_protocol: bool, timeout: float):
        self.dialogue = Dialogue()
        self.tls, self.tls_name = tls, tls_name
        self.implicit_tls, self.proxy_protocol = implicit_tls, proxy_protocol
        super().__init__(timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> Any:
        sock = socket.create_connection((host, port), timeout, self.source_address)
        if self.proxy_protocol:
            # haproxy's PROXY protocol v1: the real client is ourselves.
            family = "TCP6" if sock.family == socket.AF_INET6 else "TCP4"
            local, remote = sock.getsockname(), sock.getpeername()
            line = f"PROXY {family} {local[0]} {remote[0]} {local[1]} {remote[1]}\r\n"
            sock.sendall(line.encode("ascii"))
            self.dialogue.client(line)
        if self.implicit_tls:
            sock = self.tls.wrap_socket(sock, server_hostname=self.tls_name)
            self.dialogue.note(f"TLS {sock.version()} established, certificate verified for {self.tls_name}")
        return sock

    def connect(self, host: str = "localhost", port: int = 0, source_address: Any = None) -> tuple[int, bytes]:
        reply = super().connect(host, port, source_address)
        self._host = self.tls_name  # What starttls() verifies the certificate against.
        return reply

    def starttls(self, *args: Any, **kwargs: Any) -> tuple[int, bytes]:
        reply = super().starttls(context=self.tls)
        self.dialogue.note(f"TLS {self.sock.version()} established, certificate verified for {self.tls_name}")
        return reply

    def send(self, s: Any) -> None:
        self.dialogue.client(s)
        super().send(s)

    def getreply(self) -> tuple[int, bytes]:
        code, message = super().getreply()
        self.dialogue.server(code, message)
        return code, message


@dataclass(frozen=True)
class Result:
    code: int
    text: str
    dialogue: list[str]

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}"


def test_message(config: Config, sender: str, recipient: str, listener: str) -> bytes:
    hostname = config.server.hostname
    return (
        f"From: <{sender}>\r\n"
        f"To: <{recipient}>\r\n"
        f"Subject: mailgate send-test via {listener}\r\n"
        f"Date: {email.utils.formatdate(localtime=True)}\r\n"
        f"Message-ID: {email.utils.make_msgid('send-test', domain=hostname)}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
        f"This test message was sent by `mailgate send-test` through the {listener}\r\n"
        f"listener of {hostname}.\r\n"
    ).encode("ascii", "replace")


def send_test(
    config: Config,
    listener_index: int,
    recipient: str,
    sender: str | None = None,
    user: str | None = None,
    password: str | None = None,
    server: str | None = None,
    timeout: float = 60,
) -> Result:
    """Send one test message; the Result holds the reply that ended the attempt."""
    if not 0 <= listener_index < len(config.listeners):
        raise SendTestError(f"--listener {listener_index}: the configuration has {len(config.listeners)} listeners (0-{len(config.listeners) - 1})")
    listener = config.listeners[listener_index]
    target = parse_server(server) if server else listener_target(listener)
    sender = sender or f"mailgate-test@{config.server.hostname}"
    client = DialogueSMTP(tls_context(config), config.server.hostname, listener.implicit_tls, target.proxy_protocol, timeout)
    try:
        try:
            code, text = client.connect(target.host, target.port)
        except (OSError, smtplib.SMTPException) as e:
            raise SendTestError(f"cannot connect to {target.host}:{target.port}: {_reason(e)}") from None
        try:
            result = _converse(client, code, text, listener, user, password, sender, recipient, config)
        except smtplib.SMTPResponseException as e:
            # smtplib raises for some refusals (STARTTLS 454, AUTH 535, DATA 554...):
            # the server's reply is the result, like any other refusal.
            result = _result(client, e.smtp_code, e.smtp_error)
    except (ssl.SSLError, ssl.CertificateError) as e:
        raise SendTestError(f"TLS with {target.host}:{target.port} failed: {_reason(e)}") from None
    except (OSError, smtplib.SMTPServerDisconnected) as e:
        raise SendTestError(f"connection to {target.host}:{target.port} lost: {_reason(e)}") from None
    finally:
        client.close()
    return result


def _result(client: DialogueSMTP, code: int, text: bytes) -> Result:
    return Result(code, text.decode("utf-8", "replace").replace("\n", " "), client.dialogue.lines)


def _reason(error: BaseException) -> str:
    return getattr(error, "reason", None) or getattr(error, "strerror", None) or str(error) or type(error).__name__


def _converse(
    client: DialogueSMTP, code: int, text: bytes, listener: ListenerConfig,
    user: str | None, password: str | None, sender: str, recipient: str, config: Config,
) -> Result:  # fmt: skip
    def result(code: int, text: bytes) -> Result:
        return _result(client, code, text)

    if code != 220:
        return result(code, text)
    code, text = client.ehlo("mailgate-send-test")
    if code != 250:
        return result(code, text)
    if not listener.implicit_tls:
        if not client.has_extn("starttls"):
            return result(code, b"STARTTLS not offered by the server")
        code, text = client.starttls()
        if code != 220:
            return result(code, text)
        code, text = client.ehlo("mailgate-send-test")
        if code != 250:
            return result(code, text)
    if user is not None:
        # One mechanism, one attempt (smtplib's login() would try each in turn and
        # run into the failed-login limit).  PLAIN first: under TLS it is the usual
        # choice, and CRAM-MD5 works only for accounts that store its state.
        offered = client.esmtp_features.get("auth", "").upper().split()
        mechanism = next((m for m in ("PLAIN", "LOGIN", "CRAM-MD5") if m in offered), None)
        if mechanism is None:
            return result(code, b"no AUTH mechanism mailgate send-test knows is offered")
        client.user, client.password = user, password or ""
        respond = getattr(client, "auth_" + mechanism.lower().replace("-", "_"))
        # smtplib raises for most refusals but returns a 503 answer: either way,
        # anything but 235 means the test is not logged in and stops here.
        code, text = client.auth(mechanism, respond, initial_response_ok=mechanism == "PLAIN")
        if code != 235:
            return result(code, text)
    code, text = client.mail(sender)
    if code != 250:
        return result(code, text)
    code, text = client.rcpt(recipient)
    if code not in (250, 251):
        return result(code, text)
    code, text = client.data(test_message(config, sender, recipient, listener.role))
    final = result(code, text)
    try:
        client.quit()
    except (OSError, smtplib.SMTPException):
        pass
    return final
