"""mailgate's log: twisted.logger events, written as text or as JSON.

Every module logs through :class:`twisted.logger.Logger` with structured
fields (STYLE.md): the text observer shows the formatted line, the JSON
observers keep every field, so a line can be found by ``queue_id``,
``account``, ``provider`` or ``provider_id``.

Formats:

* text (default): ``twistd -n mailgate ...`` or ``twist mailgate ...``;
* JSON with ``twist``: ``twist --log-format json mailgate ...`` writes Twisted's
  own JSON records as an RFC 7464 JSON text sequence (each record after an
  ASCII RS);
* JSON with ``twistd``: ``twistd --logger mailgate.logging.json_observer -n
  mailgate ...`` writes the same records, one per line without the RS, which
  journald and most log shippers take as they are.

Both JSON forms are read back by :func:`twisted.logger.eventsFromJSONLogFile`.

Two lines trace a message (README.rst, "Logs"): the outcome line below, one
per message and attempt, and the SMTP session's end line.  Secrets never
appear in either, nor in any field: passwords, tokens, API keys and signing
secrets are not passed to the logger at all.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.logger import FileLogObserver, Logger, eventAsJSON

from mailgate.outcome import Delivered, Outcome
from mailgate.replies import Reply

MESSAGE_OUTCOME = (
    "message {queue_id} {status}: account={account} provider={provider} provider_id={provider_id} "
    "attempt={attempt} recipients={recipients} size={size} duration={duration:.3f}s peer={peer}: {reply}"
)


def message_status(reply: Reply, outcome: Outcome | None) -> str:
    """``delivered`` (a provider took it), ``accepted`` (taken without a provider,
    e.g. queued), ``deferred`` (4xx: it will be tried again) or ``rejected`` (5xx)."""
    if isinstance(outcome, Delivered):
        return "delivered"
    if reply.is_success:
        return "accepted"
    return "deferred" if reply.is_transient else "rejected"


def log_message_outcome(
    log: Logger,
    *,
    queue_id: str,
    account: str,
    reply: Reply,
    outcome: Outcome | None,
    attempt: int,
    duration: float,
    recipients: int,
    size: int | None,
    peer: str = "-",
    note: str | None = None,
    status: str | None = None,
) -> None:
    """The one line per message outcome (and per attempt, in queue mode).

    ``reply`` is what the client was (or, for a queued message, would have
    been) answered; ``outcome`` the provider's verdict when one was asked;
    ``note`` a detail the reply does not carry (why a message was unparsable).
    """
    text = str(reply) if note is None else f"{reply} ({note})"
    log.info(
        MESSAGE_OUTCOME,
        queue_id=queue_id,
        status=status or message_status(reply, outcome),
        account=account,
        provider=outcome.provider if outcome is not None else "-",
        provider_id=outcome.message_id if isinstance(outcome, Delivered) else "-",
        attempt=attempt,
        recipients=recipients,
        size=size if size is not None else "-",
        duration=duration,
        peer=peer,
        reply=text,
        code=reply.code,
        enhanced=reply.enhanced,
    )


def json_observer(out: IO[Any] | None = None) -> FileLogObserver:
    """``twistd --logger mailgate.logging.json_observer``: one JSON record per line.

    twistd calls it without arguments; the records go to standard output (under
    systemd, the journal), in the format ``twist --log-format json`` uses.
    """
    stream = out if out is not None else sys.stdout
    return FileLogObserver(stream, lambda event: eventAsJSON(event) + "\n")
