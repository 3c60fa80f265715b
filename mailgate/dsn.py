"""Delivery status notifications (RFC 3464): the bounce to the envelope sender.

When a message that was accepted with ``250`` finally cannot be delivered (a
permanent API rejection, or the queue lifetime ran out), the envelope sender
gets a report it can read and a program can parse (ARCHITECTURE.md, "After
acceptance"): a ``multipart/report; report-type=delivery-status`` message
(RFC 6522) with

1. a ``text/plain`` explanation for the human,
2. a ``message/delivery-status`` part (RFC 3464 §2): ``Reporting-MTA``,
   ``X-Mailgate-Queue-ID`` (an extension field, like Postfix's
   ``X-Postfix-Queue-ID``), ``Arrival-Date``, then per recipient
   ``Final-Recipient``, ``Action: failed``, ``Status``, ``Diagnostic-Code``,
   ``Last-Attempt-Date``,
3. a ``text/rfc822-headers`` part with the original message's header.

It comes from ``MAILER-DAEMON@<reporting MTA>`` and carries
``Auto-Submitted: auto-replied`` (RFC 3834 §5) so that autoresponders leave it
alone.  It must be sent with the null reverse-path ``<>`` (RFC 5321 §4.5.5),
and never to ``<>``: :func:`build_dsn` refuses an empty envelope sender.
``Original-Envelope-Id`` is absent because mailgate does not offer the DSN
SMTP extension (RFC 3461 ENVID).

Building is pure.  Everything taken from outside (addresses, diagnostics,
queue id, host name) is reduced to printable ASCII before it goes into a
header field, so none of it can start a new field or a new MIME part.
"""

from __future__ import annotations

import email.utils
import re
import secrets
from collections.abc import Sequence
from email.parser import BytesHeaderParser
from email.policy import compat32

from mailgate.replies import sanitise_text

__all__ = ["build_dsn"]

MAX_ORIGINAL_HEADERS = 64 * 1024
MAX_DIAGNOSTIC = 900
_STATUS = re.compile(r"[45]\.\d{1,3}\.\d{1,3}")
_SMTP_REPLY = re.compile(r"[45]\d\d ")
_CONTROLS = re.compile(r"[^\x20-\x7e]")
_HOST_JUNK = re.compile(r"[^A-Za-z0-9.-]")
_ID_JUNK = re.compile(r"[^A-Za-z0-9]")
_MESSAGE_ID = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]{1,250}>")


def build_dsn(
    *,
    reporting_mta: str,
    queue_id: str,
    envelope_sender: str,
    recipients: Sequence[tuple[str, str, str]],
    original_headers: bytes,
    arrival: float,
    now: float,
) -> bytes:
    """The complete DSN message, CRLF line endings, ready to be parsed and sent.

    ``recipients``: ``(address, status, diagnostic)`` for each recipient that
    failed; ``status`` an RFC 3463 code (``5.6.0``; ``4.4.7`` when the queue
    lifetime expired), ``diagnostic`` the last reply, e.g. ``"554 5.6.0
    Rejected by main: HTTP 400: ..."`` (given without a reply code, one is
    put in front to match the status).  ``arrival`` and ``now`` are Unix times.
    Raises ValueError for an empty sender, no recipients or a malformed status.
    """
    sender = _field(envelope_sender)
    if not sender:
        raise ValueError("a DSN is never sent to the null reverse-path <>")
    if not recipients:
        raise ValueError("a DSN needs at least one failed recipient")
    mta = _HOST_JUNK.sub("", reporting_mta) or "localhost"
    qid = _ID_JUNK.sub("", queue_id) or "unknown"
    failed = [(_field(address), _status(status), _diagnostic(status, text)) for address, status, text in recipients]
    headers = _original_header(original_headers)
    # RFC 2045 §6.4: a multipart is 8bit when any part is; DEL (0x7f) is still 7-bit.
    encoding = "8bit" if any(byte > 0x7F for byte in headers) else "7bit"
    boundary = _boundary(headers)
    arrival_date = email.utils.formatdate(arrival, usegmt=True)
    date = email.utils.formatdate(now, usegmt=True)

    top = [
        f"From: Mail Delivery System <MAILER-DAEMON@{mta}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {date}",
        f"Message-ID: <{qid}.{secrets.token_hex(8)}.dsn@{mta}>",
        "Auto-Submitted: auto-replied",
    ]
    original_id = _original_message_id(headers)
    if original_id:
        top += [f"In-Reply-To: {original_id}", f"References: {original_id}"]
    top += [
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        f"Content-Transfer-Encoding: {encoding}",
    ]

    human = [
        f"This is the mail gateway at {mta}.",
        "",
        *_wrap(
            f"Your message (queue id {qid}), received {arrival_date}, could not be "
            "delivered to the following recipients.  No further attempts will be made.",
            indent="",
        ),
        "",
    ]
    for address, _, diagnostic in failed:
        human += _wrap(f"<{address}>: {diagnostic}", indent="    ", first_indent="  ")
    human += ["", "The header of your message is attached."]

    report = [
        f"Reporting-MTA: dns; {mta}",
        f"X-Mailgate-Queue-ID: {qid}",
        f"Arrival-Date: {arrival_date}",
    ]
    for address, status, diagnostic in failed:
        report += [
            "",
            f"Final-Recipient: rfc822; {address}",
            "Action: failed",
            f"Status: {status}",
            *_fold(f"Diagnostic-Code: smtp; {diagnostic}"),
            f"Last-Attempt-Date: {date}",
        ]

    lines = [
        *top,
        "",
        "This is a MIME-encapsulated delivery status notification (RFC 3464).",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Description: Notification",
        "",
        *human,
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        *report,
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "Content-Description: Undelivered message header",
        f"Content-Transfer-Encoding: {encoding}",
        "",
    ]
    head = "\r\n".join(lines).encode("ascii") + b"\r\n"
    return head + headers + f"\r\n--{boundary}--\r\n".encode("ascii")


def _field(value: str) -> str:
    """Text safe inside one header field: printable ASCII, no CR or LF."""
    return _CONTROLS.sub("", value).strip()


def _status(status: str) -> str:
    status = status.strip()
    if not _STATUS.fullmatch(status):
        raise ValueError(f"not an RFC 3463 failure status: {status!r}")
    return status


def _diagnostic(status: str, text: str) -> str:
    """An SMTP-style diagnostic (RFC 3464 §2.3.6): reply code, then text."""
    cleaned = sanitise_text(text, MAX_DIAGNOSTIC)
    if not _SMTP_REPLY.match(cleaned):
        code = "554" if status.strip().startswith("5") else "451"
        cleaned = f"{code} {status.strip()} {cleaned}"
    return cleaned


def _fold(line: str, width: int = 78) -> list[str]:
    """Fold a long field at spaces (RFC 5322 §2.2.3); continuation lines start with a space."""
    return _wrap(line, indent=" ", width=width, first_indent="")


def _wrap(text: str, indent: str, width: int = 76, first_indent: str | None = None) -> list[str]:
    words = text.split(" ")
    lines: list[str] = []
    current = indent if first_indent is None else first_indent
    fresh = True
    for word in words:
        if not fresh and len(current) + 1 + len(word) > width:
            lines.append(current)
            current, fresh = indent, True
        current += word if fresh else " " + word
        fresh = False
    lines.append(current)
    return lines


def _original_header(raw: bytes) -> bytes:
    """The header section only, CRLF line endings, bounded, ending with CRLF."""
    raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    end = raw.find(b"\n\n")
    if end >= 0:
        raw = raw[: end + 1]
    if len(raw) > MAX_ORIGINAL_HEADERS:
        raw = raw[: raw.rfind(b"\n", 0, MAX_ORIGINAL_HEADERS) + 1]
    lines = [line for line in raw.split(b"\n") if line]
    # A line starting with "--" could be mistaken for a boundary by a sloppy parser.
    return b"".join(line + b"\r\n" for line in lines if not line.startswith(b"--"))


def _boundary(content: bytes) -> str:
    while True:
        boundary = f"=_mailgate_dsn_{secrets.token_hex(12)}"
        if boundary.encode("ascii") not in content:
            return boundary


def _original_message_id(headers: bytes) -> str | None:
    value = BytesHeaderParser(policy=compat32).parsebytes(headers).get("Message-ID")
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value if _MESSAGE_ID.fullmatch(value) else None
