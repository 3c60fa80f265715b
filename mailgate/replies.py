"""SMTP replies with RFC 3463 enhanced status codes.

Every reply mailgate sends is a :class:`Reply`; the catalogue below names the
fixed ones so that a code is chosen once and tested once.  RFC 2034 §3 puts the
enhanced code at the start of the text of each line of the reply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNSAFE = re.compile(r"[^\x20-\x7e]+")
MAX_REPLY_TEXT = 400  # RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets.


def sanitise_text(text: str, limit: int = MAX_REPLY_TEXT) -> str:
    """Make foreign text (an API's error message) safe inside one reply line.

    Control characters and non-ASCII are collapsed to a space, so an API cannot
    inject extra reply lines or break the client's parser; the result is bounded.
    """
    cleaned = _UNSAFE.sub(" ", text).strip()
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 3].rstrip() + "..."
    return cleaned or "no detail given"


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: basic code, enhanced code, human text (possibly several lines)."""

    code: int
    enhanced: str
    text: str

    def lines(self) -> list[bytes]:
        """Encode as reply lines: ``250-2.0.0 a`` ... ``250 2.0.0 z`` (RFC 5321 §4.2.1)."""
        texts = self.text.split("\n")
        out = []
        for index, text in enumerate(texts):
            sep = " " if index == len(texts) - 1 else "-"
            prefix = f"{self.code}{sep}"
            if self.enhanced:
                prefix += self.enhanced + " "
            out.append((prefix + text).encode("ascii", "replace"))
        return out

    @property
    def is_success(self) -> bool:
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


# Greeting and session.
SERVICE_CLOSING = Reply(221, "2.0.0", "Bye")
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
RESET_OK = Reply(250, "2.0.0", "Reset state")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
HELP = Reply(214, "2.0.0", "See RFC 5321; mailgate relays authenticated mail to an email API")
VRFY_NO = Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")

# Temporary failures.
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
SESSION_TOO_LONG = Reply(421, "4.4.2", "Session lifetime exceeded, closing connection")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many authentication failures, closing connection")
TOO_MANY_JUNK_COMMANDS = Reply(421, "4.7.0", "Too many commands without a message, closing connection")
AUTH_THROTTLED = Reply(421, "4.7.0", "Too many authentication failures from your address, try again later")
SERVER_BUSY = Reply(421, "4.7.0", "Server busy, try again later")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections from your address, try again later")
CONNECTION_RATE_EXCEEDED = Reply(421, "4.7.0", "Connection rate limit exceeded for your address, try again later")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
SPOOL_WRITE_FAILED = Reply(452, "4.3.1", "Insufficient system storage")
SPOOL_ERROR = Reply(451, "4.3.0", "Cannot queue the message now, try again later")
AUTH_TEMPFAIL = Reply(454, "4.7.0", "Temporary authentication failure")
MESSAGE_RATE_EXCEEDED = Reply(451, "4.7.1", "Message rate limit exceeded for this account, try again later")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")

# Permanent failures: syntax and sequence.
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BAD_SYNTAX = Reply(500, "5.5.2", "Syntax error, command unrecognised")
BARE_LF_COMMAND = Reply(500, "5.5.2", "Bare LF or CR in command line is not allowed")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
PARAM_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
HELO_SYNTAX = Reply(501, "5.5.4", "EHLO/HELO requires a domain name or address literal")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
EHLO_FIRST = Reply(503, "5.5.1", "Send EHLO/HELO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL before RCPT")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT before DATA")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
TLS_ALREADY = Reply(503, "5.5.1", "TLS already active")
UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognised authentication mechanism")
PARAM_NOT_RECOGNISED = Reply(555, "5.5.4", "MAIL/RCPT parameter not recognised or not implemented")
PIPELINING_VIOLATION = Reply(554, "5.5.0", "Command pipelined where it is not allowed, closing connection")
BDAT_REFUSED = Reply(554, "5.5.1", "CHUNKING is not offered: BDAT data would be read as commands, closing connection")

# Permanent failures: AUTH (RFC 4954 §6).
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
AUTH_BAD_PLAIN = Reply(501, "5.5.2", "Malformed PLAIN response")
AUTH_BAD_CRAM_MD5 = Reply(501, "5.5.2", "Malformed CRAM-MD5 response")
AUTH_NEEDS_ARGUMENT = Reply(501, "5.5.4", "AUTH requires a mechanism name")
AUTH_NO_INITIAL_RESPONSE = Reply(501, "5.5.4", "This mechanism takes no initial response")
ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")

# Permanent failures: message.
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BARE_LF_DATA = Reply(550, "5.5.2", "Bare LF or CR in message data is not allowed (RFC 5321 section 2.3.8)")
DATA_LINE_TOO_LONG = Reply(550, "5.5.2", "Message line longer than 998 octets (RFC 5322 section 2.1.1)")
NUL_IN_DATA = Reply(550, "5.6.0", "NUL octet in message data is not allowed")
UNPARSABLE_MESSAGE = Reply(554, "5.6.0", "Message could not be parsed")
SENDER_NOT_ALLOWED = Reply(553, "5.7.1", "Sender address not allowed for this account")
FROM_NOT_ALLOWED = Reply(550, "5.7.1", "From: header address not allowed for this account")
BAD_SENDER_SYNTAX = Reply(553, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(553, "5.1.3", "Bad recipient address syntax")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8, which is not supported")
