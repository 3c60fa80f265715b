"""The ``smtp`` provider: relay to an upstream SMTP server (bring your own SMTP).

For operators whose mail goes out through a server they already have, and as
a failover target behind an HTTP API.  The request is the message's envelope
(every RCPT TO, so Bcc recipients receive it; RFC 5321 §3.3) and its raw MIME
as received, minus the ``Bcc:`` header and the control headers
(:func:`mailgate.message.parse_message` removes those from ``raw`` at byte
level; everything else, mailgate's ``Received:`` header included, goes out
byte for byte).  :mod:`mailgate.smtpclient` carries it; this module is pure.

How the upstream's answer becomes an outcome (README.rst, "smtp provider"):

* 2xx to the final dot: delivered.  The id in the 250 reply is the upstream's
  ``queued as <id>`` (Postfix, SendGrid) or ``Ok[:] <id>`` (mailgate, SES)
  when it has one, else mailgate's queue id.
* 4xx at any step: transient (``451``, the upstream's enhanced code if it gave
  one); nothing was accepted, so the next provider of the route may try.
* 5xx to MAIL, RCPT, DATA or the final dot: the message is refused
  permanently with the upstream's reply code (550/552/553/554; other codes,
  such as 501 or 530, become 554) and enhanced code and its text, sanitised.
* 5xx to AUTH: the credentials are refused (``554``, like an HTTP 401).
* 5xx to the greeting, EHLO or STARTTLS concerns mailgate's session with that
  server, not the message: transient, and the route fails over.
* Any recipient refused: DATA is not sent (all or nothing, see
  :mod:`mailgate.smtpclient`); a permanent refusal fails the message naming
  the first refused recipient, otherwise it is transient.
* No connection, TLS failure (wrong certificate or host name), no STARTTLS
  offered, no usable AUTH mechanism: transient, and the route fails over.
* Timeout or lost connection before the final dot: transient, fail over;
  after it: transient and *ambiguous* (the upstream may have the message), so
  no other provider is tried and the client's retry decides.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zope.interface import implementer

from mailgate.accounts.account import Account
from mailgate.configvalues import ConfigError, is_loopback_host
from mailgate.interfaces import IProvider, ITransport
from mailgate.model import OutboundEmail
from mailgate.outcome import Delivered, Failed, Outcome, Retry
from mailgate.providers.base import safe_message_id
from mailgate.providers.mapping import setting
from mailgate.providers.providertype import ProviderType
from mailgate.smtpclient import (
    AUTH,
    INCOMPLETE_CREDENTIALS,
    MESSAGE,
    NO_AUTH,
    NO_STARTTLS,
    PROTOCOL_ERROR,
    SESSION_STAGES,
    TIMEOUT,
    TLS_FAILED,
    TLS_MODES,
    UNREACHABLE,
    SMTPRequest,
    SMTPResponse,
    SMTPTransport,
    UpstreamReply,
)
from mailgate.tls import TLSConfigError, trust_root_from_file

SETTINGS = (
    "host",
    "port",
    "tls",
    "allow_plaintext",
    "username",
    "password",
    "ca_file",
    "helo",
    "connect_timeout",
    "command_timeout",
)
CREDENTIAL_SETTINGS = ("username", "password")
ACCOUNT_SETTINGS = CREDENTIAL_SETTINGS
DEFAULT_PORTS = {"starttls": 587, "implicit": 465, "none": 25}

# Reply codes a client may receive for the final dot as they are (RFC 5321
# §4.3.2); any other permanent code from the upstream becomes 554.
_PASSED_THROUGH = frozenset({550, 552, 553, 554})
# Envelope addresses go into MAIL/RCPT lines as they are: printable ASCII only.
_ADDRESS = re.compile(r"[\x21-\x7e]*")
_QUEUED_AS = re.compile(r"(?i)\bqueued as:?\s+<?([\x21-\x3b\x3d\x3f-\x7e]+?)>?(?:\s|$)")
_OK_ID = re.compile(r"(?i)^(?:[245]\.\d{1,3}\.\d{1,3}\s+)?ok:?\s+<?([\x21-\x3b\x3d\x3f-\x7e]+?)>?\s*$")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
# What each problem means for the client: the enhanced code of the 451 (RFC 3463).
_PROBLEM_CODES = {
    UNREACHABLE: "4.4.1",  # no answer from host
    TIMEOUT: "4.4.1",
    TLS_FAILED: "4.7.5",  # cryptographic failure
    NO_STARTTLS: "4.7.10",  # encryption needed (RFC 5248 registry)
    NO_AUTH: "4.7.0",
    PROTOCOL_ERROR: "4.5.0",
    INCOMPLETE_CREDENTIALS: "4.3.5",  # system incorrectly configured
}


def upstream_message_id(reply: UpstreamReply, fallback: str) -> str:
    """The upstream's id for the message from its 250 text, or ``fallback``."""
    first = reply.text.splitlines()[0] if reply.text else ""
    match = _QUEUED_AS.search(first) or _OK_ID.match(first)
    return safe_message_id(match.group(1), fallback) if match else fallback


def _enhanced(reply: UpstreamReply, default: str) -> str:
    return reply.enhanced or default


def _permanent(provider: str, reason: str, reply: UpstreamReply) -> Failed:
    code = reply.code if reply.code in _PASSED_THROUGH else 554
    return Failed(provider, reason, code, _enhanced(reply, "5.0.0"))


@implementer(IProvider)
class SMTPProvider:
    """Adapter for an upstream SMTP server: email -> :class:`SMTPRequest`, reply -> outcome."""

    type = "smtp"

    def __init__(self, name: str, settings: Mapping[str, Any]):
        self.name = name
        self.settings = settings

    def check(self, email: OutboundEmail, account: Account) -> Failed | None:
        """Only printable-ASCII envelope addresses can be relayed (mailgate does not offer SMTPUTF8)."""
        for address in (email.envelope_sender, *email.envelope_recipients):
            if not _ADDRESS.fullmatch(address):
                return Failed(self.name, f"address {address!r} cannot be relayed", 553, "5.6.7")
        return None

    def build_requests(self, email: OutboundEmail, account: Account, message_id: str) -> list[SMTPRequest]:
        return [
            SMTPRequest(
                provider=self.name,
                message_id=message_id,
                sender=email.envelope_sender,
                recipients=tuple(email.envelope_recipients),
                body=email.raw,
                username=setting(self.name, self.settings, account, "username"),
                password=setting(self.name, self.settings, account, "password"),
            )
        ]

    def classify(self, request: SMTPRequest, response: SMTPResponse) -> Outcome:
        """The mapping of the module docstring."""
        server = response.server
        if response.problem is not None:
            return Retry(
                self.name,
                f"{server} ({response.stage}): {response.detail}",
                _PROBLEM_CODES.get(response.problem, "4.4.2"),  # 4.4.2: bad connection
                ambiguous=response.final_dot_sent,
            )
        reply = response.reply
        assert reply is not None
        if response.refused:
            return self._refused(server, response.refused)
        said = f"{server} answered {response.stage} with {reply}"
        if response.stage == MESSAGE and 200 <= reply.code < 300:
            return Delivered(self.name, upstream_message_id(reply, request.message_id))
        if 400 <= reply.code < 500:
            return Retry(self.name, said, _enhanced(reply, "4.3.0"))
        if 500 <= reply.code < 600 and response.stage not in SESSION_STAGES:
            if response.stage == AUTH:
                return Failed(self.name, f"{server} refused the credentials: {reply}", 554, _enhanced(reply, "5.7.0"))
            return _permanent(self.name, said, reply)
        if 500 <= reply.code < 600:
            # The server refuses mailgate's session, not this message: keep it, fail over.
            return Retry(self.name, said, "4.4.0")
        return Retry(self.name, f"unexpected reply: {said}", "4.5.0", ambiguous=response.final_dot_sent)

    def _refused(self, server: str, refused: tuple[tuple[str, UpstreamReply], ...]) -> Outcome:
        permanent = [(address, reply) for address, reply in refused if 500 <= reply.code < 600]
        address, reply = (permanent or list(refused))[0]
        others = len(refused) - 1
        reason = f"{server} refused recipient {address}: {reply}" + (
            f" (and {others} more recipient{'s' if others > 1 else ''})" if others else ""
        )
        if permanent:
            return _permanent(self.name, reason, reply)
        return Retry(self.name, reason, _enhanced(reply, "4.3.0") if reply.code // 100 == 4 else "4.5.0")


def _positive(name: str, settings: dict[str, Any], key: str, default: float) -> None:
    value = settings.setdefault(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"providers.{name}.{key}", "must be a finite number of seconds greater than zero")


def validate(name: str, settings: dict[str, Any]) -> None:
    """Check the settings, fill defaults (port from ``tls``; timeouts 30 s), load ``ca_file``."""

    def error(key: str, message: str) -> ConfigError:
        return ConfigError(f"providers.{name}.{key}", message)

    host = settings.get("host")
    if not isinstance(host, str) or not (_HOSTNAME.fullmatch(host) or _is_ip(host)):
        raise error("host", "required: the upstream server's host name or IP address")
    tls = settings.setdefault("tls", "starttls")
    if tls not in TLS_MODES:
        raise error("tls", f"must be one of {', '.join(TLS_MODES)}")
    allow_plaintext = settings.setdefault("allow_plaintext", False)
    if not isinstance(allow_plaintext, bool):
        raise error("allow_plaintext", "must be true or false")
    if tls == "none" and not (is_loopback_host(host) or allow_plaintext):
        raise error(
            "tls",
            '"none" sends the message (and any password) in clear: allowed to a loopback '
            "host, or elsewhere only with allow_plaintext = true",
        )
    port = settings.setdefault("port", DEFAULT_PORTS[tls])
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise error("port", "must be a TCP port number (1-65535)")
    for key in CREDENTIAL_SETTINGS:
        if key in settings and not (isinstance(settings[key], str) and settings[key]):
            raise error(key, "must be a non-empty string")
    if ("username" in settings) != ("password" in settings):
        missing = "password" if "username" in settings else "username"
        raise error(missing, "username and password must be set together")
    helo = settings.get("helo")
    if helo is not None and not (isinstance(helo, str) and _HOSTNAME.fullmatch(helo)):
        raise error("helo", "must be a domain name (letters, digits, dots, hyphens)")
    ca_file = settings.get("ca_file")
    if ca_file is not None:
        if tls == "none":
            raise error("ca_file", 'has no use with tls = "none"')
        if not isinstance(ca_file, str):
            raise error("ca_file", "must be the path of a PEM file of CA certificates")
        try:
            trust_root_from_file(Path(ca_file))  # loaded again by transport(); read errors now
        except TLSConfigError as e:
            raise error("ca_file", str(e)) from None
    _positive(name, settings, "connect_timeout", 30.0)
    if "command_timeout" in settings:
        _positive(name, settings, "command_timeout", 0)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def transport(settings: Mapping[str, Any], reactor: Any, http_client: Any, timeout: float) -> ITransport:
    """One :class:`SMTPTransport` per provider (``settings`` already validated).

    Replies are awaited up to ``command_timeout``, by default ``[delivery]
    api_timeout``; ``helo`` defaults to ``[server] hostname`` (filled by
    :mod:`mailgate.config`).
    """
    ca_file = settings.get("ca_file")
    return SMTPTransport(
        reactor,
        settings["host"],
        settings["port"],
        settings["tls"],
        settings.get("helo") or "localhost",
        float(settings["connect_timeout"]),
        float(settings.get("command_timeout", timeout)),
        trust_root=trust_root_from_file(Path(ca_file)) if ca_file else None,
    )


PROVIDER = ProviderType(
    name="smtp",
    adapter=SMTPProvider,
    settings=SETTINGS,
    credential_settings=CREDENTIAL_SETTINGS,
    account_settings=ACCOUNT_SETTINGS,
    validate=validate,
    transport=transport,
    path_settings=("ca_file",),
)
