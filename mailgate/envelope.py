"""Parsing of MAIL FROM / RCPT TO arguments (RFC 5321 §4.1.1.2-3, §4.1.2).

Stricter than stock Twisted's regular expressions: every failure maps to a
precise reply, non-ASCII addresses are refused with ``553 5.6.7`` at MAIL/RCPT
time (we do not offer SMTPUTF8, RFC 6531) instead of crashing later, and
parameters we did not advertise are refused with ``555 5.5.4`` (RFC 5321
§4.1.1.11).  Source routes are accepted and ignored (RFC 5321 §4.1.1.3 / C).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mailgate import replies
from mailgate.replies import Reply

MAX_PATH = 256  # RFC 5321 §4.5.3.1.3
MAX_LOCAL_PART = 64  # RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 §4.5.3.1.2

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LOCAL = re.compile(rf"(?:{_DOT_ATOM}|{_QUOTED})\Z")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?\Z")
_LITERAL = re.compile(r"\[(?:IPv6:[0-9A-Fa-f:.]+|[0-9.]+)\]\Z")
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?\Z")


class EnvelopeError(Exception):
    """The argument is unacceptable; :attr:`reply` says why."""

    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True)
class Path:
    """A parsed reverse-path or forward-path: address ("" for <>) and ESMTP params."""

    address: str
    params: dict[str, str | None] = field(default_factory=dict)


def parse_mail_from(argument: bytes) -> Path:
    """Parse the argument of ``MAIL`` (``FROM:<addr> [params]``)."""
    return _parse(argument, b"FROM:", allow_null=True, bad=replies.BAD_SENDER_SYNTAX)


def parse_rcpt_to(argument: bytes) -> Path:
    """Parse the argument of ``RCPT`` (``TO:<addr> [params]``)."""
    return _parse(argument, b"TO:", allow_null=False, bad=replies.BAD_RECIPIENT_SYNTAX)


def _parse(argument: bytes, keyword: bytes, allow_null: bool, bad: Reply) -> Path:
    if argument[: len(keyword)].upper() != keyword:
        raise EnvelopeError(replies.PARAM_SYNTAX)
    rest = argument[len(keyword) :].lstrip(b" ")
    if any(octet > 0x7E for octet in rest):
        raise EnvelopeError(replies.NEEDS_SMTPUTF8)
    text = rest.decode("ascii")
    if text.startswith("<"):
        close = _closing_bracket(text)
        if close < 0:
            raise EnvelopeError(bad)
        path, params_text = text[1:close], text[close + 1 :]
        if params_text and not params_text.startswith(" "):
            raise EnvelopeError(replies.PARAM_SYNTAX)
    else:
        # Many clients omit the brackets; accept a bare address (as Postfix does
        # with strict_rfc821_envelopes = no).
        path, _, params_text = text.partition(" ")
        if not path:
            # "MAIL FROM:" with nothing after it is a missing path, not the null
            # reverse-path, which must be written "<>" (RFC 5321 §4.1.2).
            raise EnvelopeError(bad)
    if len(path) > MAX_PATH:
        raise EnvelopeError(bad)
    if path.startswith("@"):
        # A source route "@a,@b:user@c": ignore the route (RFC 5321 §4.1.1.3).
        route, colon, path = path.partition(":")
        if not colon:
            raise EnvelopeError(bad)
    if path == "":
        if not allow_null:
            raise EnvelopeError(bad)
        address = ""
    else:
        address = _validate_mailbox(path, bad)
    return Path(address=address, params=_parse_params(params_text))


def _closing_bracket(text: str) -> int:
    """Index of the ``>`` closing the path, skipping quoted strings."""
    quoted = False
    escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
    return -1


def _validate_mailbox(path: str, bad: Reply) -> str:
    local, at, domain = path.rpartition("@")
    if not at or not local or not domain:
        raise EnvelopeError(bad)
    if len(local) > MAX_LOCAL_PART or len(domain) > MAX_DOMAIN:
        raise EnvelopeError(bad)
    if not _LOCAL.match(local):
        raise EnvelopeError(bad)
    if not (_DOMAIN.match(domain) or _LITERAL.match(domain)):
        raise EnvelopeError(bad)
    return f"{local}@{domain.rstrip('.').lower()}"


def _parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    # Separated by SP only (RFC 5321 §4.1.2): str.split() would also split on VT,
    # FF and the ASCII separators \x1c-\x1f, and let them pass as "spaces".
    for word in filter(None, text.split(" ")):
        match = _PARAM.match(word)
        if not match:
            raise EnvelopeError(replies.PARAM_SYNTAX)
        params[match.group(1).upper()] = match.group(2)
    return params
