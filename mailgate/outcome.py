"""What a delivery attempt came to, and the SMTP reply each outcome earns.

Adapters classify an API response into one of three outcomes (ARCHITECTURE.md,
"provider adapter"); the dispatcher turns the outcome into the reply of the
error table, always with an RFC 3463 enhanced status code.  Stock Twisted's
blanket ``550`` is never produced here.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailgate.replies import MAX_REPLY_TEXT, Reply, sanitise_text


@dataclass(frozen=True)
class Delivered:
    """The provider accepted the message; ``message_id`` is its id for it."""

    provider: str
    message_id: str

    def reply(self) -> Reply:
        return Reply(250, "2.0.0", f"Ok: {_bounded_ids(self.message_id)}")


def _bounded_ids(message_id: str, limit: int = MAX_REPLY_TEXT - len("Ok: ")) -> str:
    """The comma-joined ids of a message sent in several requests, cut to fit one
    reply line (RFC 5321 §4.5.3.1.5: 512 octets); the log keeps the full list."""
    if len(message_id) <= limit:
        return message_id
    ids = message_id.split(",")
    shown = ""
    for index, one in enumerate(ids):
        candidate = f"{shown},{one}" if shown else one
        if len(candidate) + len(f" (+{len(ids) - index - 1} more)") > limit:
            return f"{shown} (+{len(ids) - index} more)"
        shown = candidate
    return shown


@dataclass(frozen=True)
class Retry:
    """A transient failure: try again later (sync mode answers 451).

    ``after`` is the earliest retry in seconds (from ``Retry-After``) or None.
    ``enhanced`` is the RFC 3463 code that best describes the cause:
    4.4.1 no answer / connection failed, 4.7.0 rate limited, 4.3.0 provider error.
    """

    provider: str
    reason: str
    enhanced: str = "4.3.0"
    after: float | None = None
    # True when the request may have reached the API (a timeout or a reset after
    # sending): another provider must not be tried, or the message could go twice.
    ambiguous: bool = False

    def reply(self) -> Reply:
        return Reply(451, self.enhanced, f"Temporary failure at {self.provider}: {sanitise_text(self.reason)}")


@dataclass(frozen=True)
class Failed:
    """A permanent failure: the provider will never take this message as it is.

    ``code``/``enhanced`` default to ``554 5.6.0``-style content rejection; the
    adapter picks a closer code where one exists (552 5.3.4 for size).
    """

    provider: str
    reason: str
    code: int = 554
    enhanced: str = "5.0.0"
    # Envelope recipients the failing request reached all the same: a request
    # carrying several copies (a Postmark batch) some of which the API accepted.
    # The DSN leaves them out (mailgate.queue.undelivered_recipients).
    reached: tuple[str, ...] = ()

    def reply(self) -> Reply:
        return Reply(self.code, self.enhanced, f"Rejected by {self.provider}: {sanitise_text(self.reason)}")


Outcome = Delivered | Retry | Failed
