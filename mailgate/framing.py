"""Byte-level framing of the SMTP DATA stream (RFC 5321 §4.1.1.4, §4.5.2).

The only end of data is ``<CRLF>.<CRLF>``: a line consisting of a single dot,
terminated by CRLF, that follows a line terminated by CRLF.  Every other
variant (``<LF>.<LF>``, ``<LF>.<CRLF>``, ``<CR>.<CR>``, ...) is content.  That
rule, together with rejecting (or normalising) bare LF and bare CR, is what
closes the receiving half of SMTP smuggling: mailgate and any server it relays
to can never disagree about where a message ends.

The reader is pure: it writes unstuffed message bytes to a sink and reports
the first problem it found as a :class:`~mailgate.replies.Reply`, which the
session sends only after the real end of data, so an over-long or malformed
line can never return the session to command mode early (SECURITY.md item 3).

:func:`dot_stuff` is the sending half, used when mailgate relays to an upstream
SMTP server (:mod:`mailgate.smtpclient`).
"""

from __future__ import annotations

import re
from typing import BinaryIO

from mailgate import replies
from mailgate.replies import Reply

MAX_LINE = 998  # RFC 5322 §2.1.1: at most 998 characters, excluding CRLF.

# Any line break: CRLF, or a bare CR or LF (RFC 5321 §2.3.8 allows only CRLF).
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def dot_stuff(message: bytes) -> bytes:
    """``message`` as the bytes that follow ``354``, end-of-data line included.

    RFC 5321 §4.5.2: a line that starts with a dot gets a second one.  Every
    line break becomes CRLF (a bare CR or LF would let an upstream server and
    mailgate disagree about where the message ends: SMTP smuggling), the last
    line gets a CRLF if it lacked one, and ``.<CRLF>`` ends the data.

    The whole message is stuffed at once.  Twisted's ``SMTPClient`` stuffs
    chunk by chunk and so misses a dot at the start of a chunk (and on the
    first line), which could end the data early at the upstream server.
    """
    lines = _LINE_BREAK.split(message)
    if lines[-1] == b"":
        lines.pop()  # The message ended with a line break.
    stuffed = [b"." + line if line[:1] == b"." else line for line in lines]
    stuffed.append(b".")
    return b"\r\n".join(stuffed) + b"\r\n"


class DataReader:
    """Consumes the bytes that follow ``354`` until the end-of-data line.

    ``feed`` returns None while more data is needed, and the bytes that
    followed the end-of-data line (pipelined commands) once it is seen.
    After the end, :attr:`error` is None when the message is acceptable.
    """

    def __init__(self, sink: BinaryIO, max_size: int, line_endings: str = "reject"):
        self._sink = sink
        self._max_size = max_size
        self._normalize = line_endings == "normalize"
        self._partial = b""
        self._previous_ended_crlf = True  # DATA's own CRLF precedes the first line.
        self._in_overlong_line = False
        self.size = 0
        self.error: Reply | None = None
        self.done = False

    def _fail(self, reply: Reply) -> None:
        if self.error is None:
            self.error = reply

    def feed(self, data: bytes) -> bytes | None:
        buf = self._partial + data if self._partial else data
        pos = 0
        out: list[bytes] = []
        leftover = None
        while True:
            newline = buf.find(b"\n", pos)
            if newline < 0:
                rest = buf[pos:]
                # A complete line may hold MAX_LINE octets plus a stuffed leading
                # dot and the CR of its CRLF; only beyond that is it certainly too
                # long, whatever the packet boundaries (same verdict as _line).
                if len(rest) > MAX_LINE + 2:
                    # Keep only the last octet (it may be the CR of a CRLF) so that
                    # memory stays bounded however long the line runs.
                    self._fail(replies.DATA_LINE_TOO_LONG)
                    self._in_overlong_line = True
                    rest = rest[-1:]
                self._partial = rest
                break
            line_end_crlf = newline > pos and buf[newline - 1] == 0x0D
            body = buf[pos : newline - 1] if line_end_crlf else buf[pos:newline]
            pos = newline + 1
            continuing = self._in_overlong_line
            self._in_overlong_line = False
            if (
                body == b"."
                and line_end_crlf
                and self._previous_ended_crlf
                and not continuing
            ):
                self.done = True
                leftover = buf[pos:]
                self._partial = b""
                break
            self._previous_ended_crlf = line_end_crlf
            out.append(self._line(body, line_end_crlf, continuing))
        if out and self.error is None:
            try:
                self._sink.write(b"".join(out))
            except OSError:
                # Disk full (the spool rolled over to a file): keep reading to the
                # real end of data, then answer 452 (RFC 5321 §4.2.2); never drop.
                self._fail(replies.SPOOL_WRITE_FAILED)
        return leftover

    def _line(self, body: bytes, line_end_crlf: bool, continuing: bool) -> bytes:
        if not continuing and body[:1] == b".":
            body = body[1:]  # RFC 5321 §4.5.2 transparency.
        if len(body) > MAX_LINE:
            self._fail(replies.DATA_LINE_TOO_LONG)
        if b"\x00" in body:
            self._fail(replies.NUL_IN_DATA)
        bare_cr = b"\r" in body
        if bare_cr or not line_end_crlf:
            if not self._normalize:
                self._fail(replies.BARE_LF_DATA)
            elif bare_cr:
                body = body.replace(b"\r", b"\r\n")
        self.size += len(body) + 2
        if self.size > self._max_size:
            self._fail(replies.MESSAGE_TOO_BIG)
        if self.error is not None:
            return b""
        return body + b"\r\n"
