"""How the neutral email maps onto the fields that JSON email APIs share.

Postmark, SendGrid and Bento (and most of their kind) take recipients, headers
and attachments as JSON fields rather than raw MIME, and each of them derives
*who receives the message* from those fields.  ARCHITECTURE.md §1 says the SMTP
envelope decides that, so the adapters build their fields through this module:

* :func:`split_recipients`: ``To`` and ``Cc`` keep only the header addresses
  that are envelope recipients (a header address nobody sent ``RCPT TO`` for,
  as in a mailing-list expansion or a Postfix relay that splits recipients,
  must not receive a copy); every other envelope recipient is ``Bcc``.  APIs
  that require a ``To`` get the ``Cc`` list there when ``To`` is left empty,
  and one copy per recipient (each addressed to that recipient alone) when
  every recipient is blind, so no blind recipient is ever shown to another.
* :func:`envelope_share`: which envelope recipients one request delivers to,
  for an adapter that splits a message into several requests.
* :func:`forwarded_headers`: the message's own headers minus those that the
  API rebuilds or that would be false after it re-signs the message (DKIM,
  ARC, authentication results), plus ``Message-ID`` when the client asked to
  keep it (``X-Mailgate-Keep-Message-ID`` / ``X-PM-KeepID``).
* :func:`bodies`: the text and HTML to send, an empty part counting as
  absent (an empty HTML part would show a blank message), and a one-space
  text when there is no body at all (the APIs refuse a message without one).
* :func:`attachment_name`: APIs require a file name; a nameless part gets one
  made from its media type.
* :func:`encoded_size` and :func:`check_limits`: per-provider recipient and
  size limits, answered with the replies of ARCHITECTURE.md §4 before a single
  request is sent.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mailgate.accounts.account import Account
from mailgate.model import Attachment, EmailAddress, OutboundEmail
from mailgate.outcome import Failed

# Headers never forwarded to an API: signatures and verdicts about the message as
# the client sent it, which the API's rebuilt message would make false (RFC 6376,
# RFC 8617, RFC 8601).
UNFORWARDED_HEADERS = frozenset(
    {
        "dkim-signature",
        "domainkey-signature",
        "arc-seal",
        "arc-message-signature",
        "arc-authentication-results",
        "authentication-results",
        "received-spf",
    }
)


def setting(provider: str, settings: Mapping[str, Any], account: Account, key: str) -> Any:
    """The account's own value for ``key`` at ``provider`` if it has one, else the server's."""
    own = account.provider_settings.get(provider, {})
    return own.get(key, settings.get(key))


@dataclass(frozen=True)
class Recipients:
    """The visible and blind recipients of one API request."""

    to: tuple[EmailAddress, ...]
    cc: tuple[EmailAddress, ...] = ()
    bcc: tuple[EmailAddress, ...] = ()

    @property
    def count(self) -> int:
        return len(self.to) + len(self.cc) + len(self.bcc)

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address of this request: To, Cc and Bcc."""
        return tuple(address.address for address in (*self.to, *self.cc, *self.bcc))


def envelope_share(email: OutboundEmail, addresses: Iterable[str]) -> tuple[str, ...]:
    """The envelope recipients a request sent to ``addresses`` delivers to, as the
    envelope spells them (``HTTPRequest.recipients``).

    Matched case-insensitively, like :func:`split_recipients`, which keeps a
    header address only when it is an envelope recipient: ``To: Bob@Example.org``
    delivers to ``RCPT TO:<bob@example.org>``.  Blind recipients are envelope
    recipients (ARCHITECTURE.md §1), so they are in the share of the request
    that carries them as ``Bcc``.
    """
    return share_of(email.envelope_recipients, addresses)


def share_of(recipients: Iterable[str], addresses: Iterable[str]) -> tuple[str, ...]:
    """The ``recipients`` found among ``addresses`` (case-insensitively), in the
    order and spelling of ``recipients``: :func:`envelope_share`'s rule."""
    wanted = {address.lower() for address in addresses}
    return tuple(recipient for recipient in recipients if recipient.lower() in wanted)


def split_recipients(email: OutboundEmail, require_to: bool = True) -> list[Recipients]:
    """The envelope recipients as To/Cc/Bcc groups, one group per request copy.

    Usually one group.  Header addresses outside the envelope are dropped, and
    an address listed twice is kept once (the first time).  With
    ``require_to`` (the API refuses a message without ``To``): an empty ``To``
    takes the ``Cc`` addresses; when every recipient is blind there is one
    group per recipient, addressed ``To`` that recipient alone.
    """
    envelope = {address.lower() for address in email.envelope_recipients}
    seen: set[str] = set()

    def keep(addresses: Sequence[EmailAddress]) -> tuple[EmailAddress, ...]:
        kept = []
        for address in addresses:
            folded = address.address.lower()
            if folded in envelope and folded not in seen:
                seen.add(folded)
                kept.append(address)
        return tuple(kept)

    to, cc = keep(email.to), keep(email.cc)
    bcc = keep(email.bcc)
    if not require_to or to:
        return [Recipients(to, cc, bcc)]
    if cc:
        return [Recipients(cc, (), bcc)]
    return [Recipients((address,)) for address in bcc]


def forwarded_headers(
    email: OutboundEmail, reserved: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """Headers to pass through the API's custom-header field, in message order.

    ``reserved`` (lower case) adds the names this API refuses or sets itself.
    """
    dropped = UNFORWARDED_HEADERS | reserved
    headers = [(name, value) for name, value in email.headers if name.lower() not in dropped]
    if email.controls.keep_message_id and email.message_id and "message-id" not in dropped:
        headers.append(("Message-ID", f"<{email.message_id}>"))
    return headers


def bodies(email: OutboundEmail) -> tuple[str | None, str | None]:
    """``(text, html)`` to send: empty bodies are None; with neither, the text is one space.

    Postmark refuses a message with no ``TextBody`` or ``HtmlBody`` (error
    300) and SendGrid a ``content`` value under one character.
    """
    text, html = email.text or None, email.html or None
    if text is None and html is None:
        text = " "
    return text, html


def attachment_name(part: Attachment, index: int) -> str:
    """The part's file name, or ``attachment-<n>.<ext>`` (``inline-<n>...``) from its type."""
    if part.filename:
        return part.filename
    extension = mimetypes.guess_extension(part.content_type, strict=False) or ".bin"
    return f"{'inline' if part.inline else 'attachment'}-{index + 1}{extension}"


def base64_size(size: int) -> int:
    """Length of the base64 encoding of ``size`` bytes (RFC 4648 §4, with padding)."""
    return 4 * ((size + 2) // 3)


def encoded_size(email: OutboundEmail) -> int:
    """Bytes the message takes in a JSON API request: bodies plus base64 attachments.

    What the APIs' "total message size" limits measure, near enough: headers
    and JSON syntax add a few hundred bytes.
    """
    size = len((email.text or "").encode("utf-8")) + len((email.html or "").encode("utf-8"))
    return size + sum(base64_size(part.size) for part in email.attachments)


def distinct_recipients(email: OutboundEmail) -> int:
    """Envelope recipients counted once each, case-insensitively (what the APIs count)."""
    return len({address.lower() for address in email.envelope_recipients})


def check_limits(
    provider: str,
    label: str,
    recipients: int,
    size: int,
    max_recipients: int | None = None,
    max_size: int | None = None,
) -> Failed | None:
    """ARCHITECTURE.md §4 replies for a provider's documented limits.

    Too many recipients is ``452 4.5.3`` (RFC 5321 §4.5.3.1.10: the client may
    send the rest in another transaction); too large is ``552 5.3.4``.
    ``label`` is the API's name as users know it ("Postmark").
    """
    if max_recipients is not None and recipients > max_recipients:
        return Failed(
            provider,
            f"{label} accepts at most {max_recipients} recipients per message; "
            f"this one has {recipients}",
            452,
            "4.5.3",
        )
    if max_size is not None and size > max_size:
        return Failed(
            provider,
            f"message too large for {label}: {size} bytes once encoded, "
            f"the limit is {max_size}",
            552,
            "5.3.4",
        )
    return None
