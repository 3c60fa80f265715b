"""The neutral email: what every provider adapter receives.

One SMTP transaction becomes exactly one :class:`OutboundEmail` (ARCHITECTURE.md,
"one transaction, one message, one reply").  Recipients come from the SMTP
envelope (RFC 5321 §3.3): every RCPT TO receives the message, and the Bcc list
is derived as the envelope recipients that appear in neither ``To`` nor ``Cc``.
A ``Bcc:`` header is never carried here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EmailAddress:
    """A mailbox: display name (decoded, may be empty) and addr-spec."""

    address: str
    name: str = ""

    def formatted(self) -> str:
        """RFC 5322 ``name <address>`` form (unencoded; adapters encode if needed)."""
        if not self.name:
            return self.address
        escaped = self.name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}" <{self.address}>'


@dataclass(frozen=True)
class Attachment:
    """A non-body MIME part: a download attachment or an inline (``cid:``) part."""

    filename: str | None
    content_type: str
    content: bytes = field(repr=False)
    content_id: str | None = None
    inline: bool = False

    @property
    def size(self) -> int:
        return len(self.content)


@dataclass(frozen=True)
class Controls:
    """Values of the control headers (ARCHITECTURE.md §6), after account defaults.

    ``None`` means "not set": the provider's own default applies.
    """

    tags: tuple[str, ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()
    stream: str | None = None
    track_opens: bool | None = None
    track_clicks: bool | None = None
    # Postmark's X-PM-TrackLinks mode ("HtmlAndText", "HtmlOnly", "TextOnly" or
    # "None") when the message chose one; ``track_clicks`` says on/off for every
    # provider, this only refines which bodies get tracked links.
    track_links_mode: str | None = None
    transactional: bool | None = None
    layout: str | None = None
    inline_css: bool | None = None
    keep_message_id: bool | None = None
    # X-SMTPAPI (SendGrid) JSON object, kept verbatim for adapters that use it.
    smtpapi: str | None = None

    @property
    def metadata_dict(self) -> dict[str, str]:
        return dict(self.metadata)


@dataclass(frozen=True)
class OutboundEmail:
    """One parsed message plus its envelope.

    ``headers`` holds the headers that should be forwarded verbatim: everything
    except the structural ones the model already carries (From, To, Cc, Bcc,
    Reply-To, Subject, Message-ID, Date, MIME-Version, Content-*) and the
    control headers.
    """

    envelope_sender: str  # "" for the null reverse-path <>
    envelope_recipients: tuple[str, ...]
    from_: EmailAddress | None
    reply_to: tuple[EmailAddress, ...]
    to: tuple[EmailAddress, ...]
    cc: tuple[EmailAddress, ...]
    bcc: tuple[EmailAddress, ...]
    subject: str
    text: str | None
    html: str | None
    attachments: tuple[Attachment, ...]
    headers: tuple[tuple[str, str], ...]
    message_id: str | None
    date: str | None
    controls: Controls
    raw: bytes = field(repr=False)
    # Every mailbox of every From, Sender, Resent-From and Resent-Sender field:
    # what an account's sender restriction must cover (not just ``from_``).
    author_addresses: tuple[str, ...] = ()

    @property
    def inline_parts(self) -> tuple[Attachment, ...]:
        return tuple(a for a in self.attachments if a.inline)

    @property
    def download_attachments(self) -> tuple[Attachment, ...]:
        return tuple(a for a in self.attachments if not a.inline)
