"""Raw MIME -> :class:`mailgate.model.OutboundEmail`.

ARCHITECTURE.md "Data flow": at the end of DATA the message is parsed once into
the neutral model that every provider adapter receives.  The parser is the
standard library's :mod:`email` package with ``policy.default`` (RFC 5322,
RFC 2045-2049, RFC 2047 encoded words, RFC 2231 parameters, RFC 6532 UTF-8
headers), so that decoding rules are those of a maintained implementation.

Decided semantics (ARCHITECTURE.md §1, §6):

* Recipients come from the SMTP envelope.  ``bcc`` is the envelope recipients
  that appear in neither ``To`` nor ``Cc`` (compared case-insensitively), in
  envelope order.  A ``Bcc:`` header (and ``Resent-Bcc:``) is never used, never
  listed in ``headers`` and removed from ``raw``.
* Control headers are read into ``controls`` and removed from ``headers`` and
  ``raw`` (:mod:`mailgate.controls`).
* When ``controls.inline_css`` is set, ``html`` has its CSS inlined
  (:mod:`mailgate.inlinecss`), once, for every provider.

``raw`` is filtered at byte level, header block only, so the body reaches
raw-MIME providers byte-for-byte as the client sent it.

The parser is lenient: almost any input yields a model.  :class:`MessageParseError`
is raised only when the input exceeds the structural limits of
:class:`MimeLimits` (or nests deeper than the interpreter can recurse); nothing
else ever escapes :func:`parse_message`.

Parsing cost is bounded before and while the stdlib parser works, so a MIME
bomb costs little more than reading it: the top-level header block is measured
on the raw bytes before parsing; the product of line count and nesting, and
the line count itself, are bounded up front (:data:`MAX_PARSE_WORK`,
:data:`MAX_LINES`); depth, part count and the size of
every part's header block are checked as the parser creates each part; and the
number of addresses in an address header is bounded before the RFC 5322 address
parser runs.
"""

from __future__ import annotations

import binascii
import codecs
import html
import quopri
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email import policy as email_policy
from email.generator import BytesGenerator, Generator
from email.header import decode_header
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage, Message
from email.feedparser import BytesFeedParser
from email.utils import collapse_rfc2231_value, getaddresses
from io import BytesIO, StringIO
from typing import ClassVar

from mailgate.controls import extract_controls, is_control_header
from mailgate.inlinecss import inline_css
from mailgate.model import Attachment, EmailAddress, OutboundEmail

__all__ = [
    "MAX_DEPTH",
    "MAX_PARSE_WORK",
    "DEFAULT_LIMITS",
    "MAX_PARTS",
    "MessageParseError",
    "MessageTooLarge",
    "MimeLimits",
    "parse_message",
    "text_to_html",
]

#: Most MIME parts (every node of the tree, containers included, and the parts
#: of attached messages) a message may have.  Real mail has a handful.
MAX_PARTS = 1000
#: Deepest MIME nesting accepted (the top level is depth 0).  Real mail rarely
#: goes past 5; a forwarded chain of attached messages adds 2-3 per message.
MAX_DEPTH = 32
#: Upper bound on (line count x possible nesting depth) checked *before*
#: parsing.  The stdlib feed parser tests every line against the boundary of
#: every enclosing multipart, so its cost grows as lines x nesting depth
#: (about 0.17 us per unit measured); depth is at most the number of
#: "multipart" occurrences, and the parser stops one level past the depth
#: limit.  A crafted 10 MiB message of short lines inside many nested
#: multiparts would otherwise take minutes; with this bound the extra cost
#: stays under about 2 s.  It admits, e.g., 10 MiB of base64 attachments (~140k
#: lines) at any nesting the depth limit allows, or 500k short lines nested 20
#: deep.
MAX_PARSE_WORK = 10_000_000
#: Most lines a message may have.  The stdlib parser keeps every line as an
#: object while it parses (about 70 octets each, measured: a 1 MiB message of
#: empty lines peaks at 25 MiB), so short lines, not size, decide its memory;
#: this caps a message at about 35 MiB of parser memory.  Real mail averages
#: far more than 20 octets per line, so even 10 MiB stays under the cap.
MAX_LINES = 500_000
#: Largest single header field (with its continuation lines), whatever the
#: block limit: see :class:`_HeaderBlockMeter`.
MAX_FIELD_SIZE = 64 * 1024
#: Parameters (";"-separated) in one ``Content-*`` field.  Real ones carry a
#: handful; the stdlib's parameter parser costs about 1 ms per KiB of them,
#: so 150 parts of 3,500 parameters each would cost seconds of CPU.
MAX_CONTENT_PARAMETERS = 100
#: Encoded words in one field beyond which it is decoded without the stdlib's
#: RFC 2047 parser (:func:`_dense_encoded_words`).  A long subject in a
#: non-Latin script has about ten.
MAX_ENCODED_WORDS = 100


@dataclass(frozen=True)
class MimeLimits:
    """Structural limits on one message (``[limits]`` in mailgate.toml).

    Exceeding ``max_header_size`` (the octets of one header block, the top
    level's or a part's) raises :class:`MessageTooLarge` (``552 5.3.4``); the
    others raise :class:`MessageParseError` (``554 5.6.0``).
    """

    max_depth: int = MAX_DEPTH
    max_parts: int = MAX_PARTS
    max_header_size: int = 256 * 1024
    max_header_count: int = 500
    max_addresses_per_header: int = 1000
    max_parse_work: int = MAX_PARSE_WORK


DEFAULT_LIMITS = MimeLimits()
# For a message read back from the queue's spool: it passed the limits in force
# when it was accepted, and parsing it again must not refuse it (and bounce a
# message that got a 250) because ``[limits]`` changed since.  Its structure is
# bounded by what those limits let through, so no bound is needed here.
STORED_MESSAGE_LIMITS = MimeLimits(
    max_depth=sys.maxsize,
    max_parts=sys.maxsize,
    max_header_size=sys.maxsize,
    max_header_count=sys.maxsize,
    max_addresses_per_header=sys.maxsize,
    max_parse_work=sys.maxsize,
)

# Re-serialising attached messages: keep header lines as they were.
_GENERATOR_POLICY = email_policy.default.clone(linesep="\r\n", refold_source="none")


class _CachingHeaderFactory:
    """``policy.default``'s header factory, memoised for one message.

    The stdlib re-parses a header (e.g. Content-Type, through the RFC 5322
    parser in ``email._header_value_parser``) on *every* access, and the feed
    parser and ``get_body`` access Content-Type many times per part; caching
    the immutable header objects makes parsing about three times faster.  One
    instance per message, so the cache lives and dies with it.  The header
    classes, which ``HeaderRegistry`` rebuilds with ``type()`` on every call,
    are shared process-wide (one per registered class, so the set is bounded).
    """

    _registry: ClassVar[HeaderRegistry] = HeaderRegistry()
    _classes: ClassVar[dict[type, type]] = {}

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], BaseHeader] = {}

    def __call__(self, name: str, value: str) -> BaseHeader:
        key = (name.lower(), value)
        header = self._cache.get(key)
        if header is None:
            registry = self._registry
            base = registry.registry.get(key[0], registry.default_class)
            cls = self._classes.get(base)
            if cls is None:
                cls = self._classes[base] = registry[key[0]]
            if _dense_encoded_words(value):
                # Parsed as literal text: see _dense_encoded_words.  Subject, other
                # unstructured fields and address fields never get here this way.
                value = value.replace("=?", "= ?")
            header = self._cache[key] = cls(name, value)
        return header


# RFC 2045 §5.1 token characters, minus "*", "%" and "'" (RFC 2231 parameter
# syntax, which only the structured header parser decodes).
_TOKEN = r"[A-Za-z0-9!#$&^_.+`{|}~-]+"
# Well-formed, plain-ASCII values of the two headers the feed parser and the
# body walk read most.  A quoted value may not contain "=?" (RFC 2047 encoded
# words are only decoded by the structured parser).
_SIMPLE_VALUE = {
    "content-type": re.compile(
        rf'[ \t]*{_TOKEN}/{_TOKEN}[ \t]*(?:;[ \t]*{_TOKEN}=(?:{_TOKEN}|"(?:[^"\\\r\n=]|=(?!\?))+")[ \t]*)*;?[ \t]*'
    ),
    "content-transfer-encoding": re.compile(rf"[ \t]*{_TOKEN}[ \t]*"),
}


class _ParsedMessage(EmailMessage):
    """``EmailMessage`` that reads well-formed Content-Type and
    Content-Transfer-Encoding values as plain strings.

    Every stdlib caller of these two headers (``get_content_type``,
    ``get_param`` and so ``get_boundary``/``get_content_charset``, and
    ``get_payload(decode=True)``) only uses ``str()`` of the header object, so
    for values matching :data:`_SIMPLE_VALUE` the plain unfolded string gives
    the same answers (tests/test_message.py checks this against the stock path
    with hypothesis) without running the RFC 5322 structured parser, which was
    about 40% of the parse time of a typical multipart message.  Anything
    else (non-ASCII, comments, RFC 2047/2231, malformed) takes the stock path.
    """

    def get(self, name: str, failobj: object = None) -> object:
        lowered = name.lower()
        simple = _SIMPLE_VALUE.get(lowered)
        if simple is None:
            return super().get(name, failobj)
        for key, value in self._headers:
            if key.lower() == lowered:
                # As EmailPolicy.header_fetch_parse unfolds: drop every CR and LF.
                unfolded = value.replace("\r", "").replace("\n", "")
                if simple.fullmatch(unfolded):
                    return unfolded
                return self.policy.header_fetch_parse(key, value)
        return failobj


# Headers the model carries in dedicated fields, trace headers, and Bcc.
_STRUCTURAL = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "resent-bcc",
        "reply-to",
        "subject",
        "message-id",
        "date",
        "mime-version",
        "return-path",
        "received",
    }
)
# Headers that name who wrote or sent a message (RFC 5322 §3.6.2, §3.6.6): all of
# them are checked against an account's allowed senders.
_AUTHOR_HEADERS = ("from", "sender", "resent-from", "resent-sender")
# Removed from ``raw``: never disclose blind recipients (ARCHITECTURE.md §1).
_RAW_DROP = frozenset({"bcc", "resent-bcc"})

# What the stdlib feed parser accepts as a header line (email.feedparser.headerRE),
# in bytes: the header block ends at the first line that does not match.
_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")
_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n|\Z)")
_LINE_BREAKS = re.compile(r"\r\n|\r|\n")
_MSGID = re.compile(r"<([^<>]*)>")
_MULTIPART = re.compile(rb"(?i)multipart")
_ADDRESS_HEADERS = frozenset(
    {
        "from", "sender", "reply-to", "to", "cc", "bcc",
        "resent-from", "resent-sender", "resent-to", "resent-cc", "resent-bcc",
    }
)  # fmt: skip
# A quoted string, closed or not: a match never fails midway, so the scan is linear.
_QUOTED_STRING = re.compile(r'"(?:[^"\\]|\\.)*(")?', re.DOTALL)
_ADDRESS_SEPARATOR = re.compile(r"[,;]")
_SPACE_RUN = re.compile(r"^ +| {2,}")
# Codecs that are not character sets, or whose decoding cost is superlinear.
_BAD_CODECS = frozenset({"idna", "punycode", "undefined", "unicode_escape", "raw_unicode_escape"})


class MessageParseError(Exception):
    """The message cannot be turned into an OutboundEmail; ``reason`` says why.

    The SMTP layer answers 554 5.6.0 with the reason (ARCHITECTURE.md §4).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MessageTooLarge(MessageParseError):
    """A header block exceeds its size limit; the SMTP layer answers 552 5.3.4."""


class _HeaderBlockMeter:
    """Measures one header block line by line; raises at the first limit passed.

    Besides the block's size and field count, one field (with its continuation
    lines) may not exceed :data:`MAX_FIELD_SIZE`: the stdlib's RFC 2047 and
    RFC 5322 parsers take time superlinear in a field's length (a 160 KiB
    Subject of encoded words took 3 s), so the cap bounds the cost of each.
    """

    def __init__(self, limits: MimeLimits) -> None:
        self.limits = limits
        self.octets = self.fields = self.field_octets = self.parameters = 0
        self.content_field = False

    def line(self, text: str | bytes, continuation: bool) -> None:
        length = len(text)
        self.octets += length
        if continuation:
            self.field_octets += length
        else:
            self.fields += 1
            self.field_octets = length
            self.content_field = text[:8].lower() in ("content-", b"content-")
            self.parameters = 0
        if self.content_field:
            self.parameters += text.count(";" if isinstance(text, str) else b";")
            if self.parameters > MAX_CONTENT_PARAMETERS:
                raise MessageParseError(f"a Content-* header field has more than {MAX_CONTENT_PARAMETERS} parameters")
        if self.octets > self.limits.max_header_size:
            raise MessageTooLarge(f"header block larger than {self.limits.max_header_size} octets")
        if self.field_octets > MAX_FIELD_SIZE:
            raise MessageTooLarge(f"header field larger than {MAX_FIELD_SIZE} octets")
        if self.fields > self.limits.max_header_count:
            raise MessageParseError(f"more than {self.limits.max_header_count} header fields in one block")


class _LimitedFeedParser(BytesFeedParser):
    """The stdlib feed parser, stopped as soon as the message exceeds a structural limit.

    ``email.feedparser.FeedParser`` creates every part, attached messages'
    parts included, through ``_new_message`` (the parent's depth is the length
    of ``_msgstack``) and hands every header block to ``_parse_headers``
    (CPython 3.11-3.13, Lib/email/feedparser.py).  Checking there stops the
    parse before it spends work on the part that breaks a limit, and before a
    deep nest of generators could exhaust the interpreter's recursion.  The
    exception propagates out of ``feed``; the parser is then discarded.
    """

    def __init__(self, limits: MimeLimits, policy: email_policy.EmailPolicy) -> None:
        super().__init__(policy=policy)
        self._limits = limits
        self._parts = 0

    def _new_message(self) -> None:
        if len(self._msgstack) > self._limits.max_depth:
            raise MessageParseError(f"MIME parts nested deeper than {self._limits.max_depth} levels")
        self._parts += 1
        if self._parts > self._limits.max_parts:
            raise MessageParseError(f"message has more than {self._limits.max_parts} MIME parts")
        super()._new_message()  # type: ignore[misc]

    def _parse_headers(self, lines: list[str]) -> None:
        meter = _HeaderBlockMeter(self._limits)
        for line in lines:
            meter.line(line, line[:1] in (" ", "\t"))
        super()._parse_headers(lines)  # type: ignore[misc]


def _prescan_top_header_block(raw: bytes, limits: MimeLimits) -> None:
    """Measure the top-level header block on the raw bytes, before the parser
    turns it into millions of line objects; the scan stops at the size limit.
    Lines count as headers exactly as in :func:`without_hidden_headers` (the parser's rule)."""
    meter = _HeaderBlockMeter(limits)
    pos = 0
    end = len(raw)
    while pos < end:
        match = _LINE.match(raw, pos)
        assert match is not None
        line = match.group()
        if not line or not _HEADER_LINE.match(line):
            break
        meter.line(line, line[:1] in (b" ", b"\t"))
        pos = match.end()


def parse_message(
    raw: bytes,
    envelope_sender: str,
    envelope_recipients: Sequence[str],
    defaults: Mapping[str, str] = {},
    limits: MimeLimits = DEFAULT_LIMITS,
) -> OutboundEmail:
    """Parse ``raw`` (as received after dot-unstuffing, CRLF line endings) once.

    ``defaults`` are the account's control-header defaults
    (:func:`mailgate.controls.extract_controls`).  Raises
    :class:`MessageParseError` (:class:`MessageTooLarge` for an oversized
    header block) and nothing else for bad input; a ``raw`` that is not
    bytes-like is a programming error (``TypeError``).
    """
    if isinstance(raw, (bytearray, memoryview)):
        raw = bytes(raw)
    if not isinstance(raw, bytes):
        raise TypeError(f"raw must be bytes, not {type(raw).__name__}")
    try:
        return _parse(raw, envelope_sender, tuple(envelope_recipients), defaults, limits)
    except MessageParseError:
        raise
    except RecursionError:
        raise MessageParseError("MIME structure is nested too deeply") from None
    except Exception as exc:  # the stdlib parser is lenient, but be certain
        # The cause stays attached so that logs and tests can see the bug.
        raise MessageParseError(f"unparsable message ({type(exc).__name__})") from exc


def _parse(
    raw: bytes,
    envelope_sender: str,
    envelope_recipients: tuple[str, ...],
    defaults: Mapping[str, str],
    limits: MimeLimits,
) -> OutboundEmail:
    _prescan_top_header_block(raw, limits)
    lines = max(raw.count(b"\n"), raw.count(b"\r")) + 1
    if lines * min(len(_MULTIPART.findall(raw)), limits.max_depth + 1) > limits.max_parse_work:
        raise MessageParseError("MIME structure too complex for the message size")
    if lines > MAX_LINES:
        raise MessageTooLarge(f"message has more than {MAX_LINES} lines")
    policy = email_policy.default.clone(header_factory=_CachingHeaderFactory(), message_factory=_ParsedMessage)
    parser = _LimitedFeedParser(limits, policy)
    parser.feed(raw)
    msg = parser.close()
    assert isinstance(msg, EmailMessage)
    _check_address_counts(msg, limits)

    leaves, related_leaves = _walk(msg)

    # RFC 2046 §5.1.4 (alternative) and RFC 2387 (related) body selection, as
    # implemented by EmailMessage.get_body; attachments are never bodies.
    text_part = msg.get_body(preferencelist=("plain",))
    html_part = msg.get_body(preferencelist=("html",))
    text = _decode_text(text_part) if text_part is not None else None
    html_body = _decode_text(html_part) if html_part is not None else None

    attachments = tuple(
        _attachment(part, id(part) in related_leaves)
        for part in leaves
        if part is not text_part and part is not html_part
    )

    headers: list[tuple[str, str]] = []
    all_headers: list[tuple[str, str]] = []
    for name, value in msg.raw_items():
        lname = name.lower()
        control = is_control_header(name)
        if lname in _STRUCTURAL or lname.startswith("content-"):
            continue
        value_str = _header_str(msg, name, value)
        all_headers.append((name, value_str))
        if not control:
            headers.append((name, value_str))

    to = _addresses(msg, "to")
    cc = _addresses(msg, "cc")
    seen = {a.address.lower() for a in to + cc}
    bcc: list[EmailAddress] = []
    for rcpt in envelope_recipients:
        folded = rcpt.lower()
        if folded not in seen:
            seen.add(folded)
            bcc.append(EmailAddress(rcpt, ""))

    from_list = _addresses(msg, "from")
    subject = _first_header_str(msg, "subject")
    controls = extract_controls(all_headers, defaults)
    if controls.inline_css and html_body:
        html_body = inline_css(html_body)

    return OutboundEmail(
        envelope_sender=envelope_sender,
        envelope_recipients=envelope_recipients,
        from_=from_list[0] if from_list else None,
        reply_to=_addresses(msg, "reply-to"),
        to=to,
        cc=cc,
        bcc=tuple(bcc),
        subject=subject or "",
        text=text,
        html=html_body,
        attachments=attachments,
        headers=tuple(headers),
        message_id=_message_id(msg),
        date=_raw_header(msg, "date") or None,
        controls=controls,
        raw=without_hidden_headers(raw),
        author_addresses=tuple(
            mailbox.address
            for name in _AUTHOR_HEADERS
            for mailbox in (from_list if name == "from" else _addresses(msg, name))
        ),
    )


def _check_address_counts(msg: Message, limits: MimeLimits) -> None:
    """Refuse an address header with too many addresses before parsing it.

    The RFC 5322 address parser costs up to half a millisecond per address;
    separators outside quoted strings bound the number of addresses (a comma in
    a comment may count once too often), in linear time.  Repeated fields of
    one name (two To: fields) count together, as the model merges them.
    """
    limit = limits.max_addresses_per_header
    counts: dict[str, int] = {}
    for name, value in msg.raw_items():
        key = name.lower()
        if key not in _ADDRESS_HEADERS:
            continue
        if value.count(",") + value.count(";") < limit:
            bound = value.count(",") + value.count(";") + 1
        else:
            unquoted = _QUOTED_STRING.sub(_drop_closed_quote, value)
            bound = len(_ADDRESS_SEPARATOR.findall(unquoted)) + 1
        counts[key] = counts.get(key, 0) + bound
        if counts[key] > limit:
            raise MessageParseError(f"{name} header has more than {limit} addresses")


def _drop_closed_quote(match: re.Match[str]) -> str:
    """A quoted string's commas separate nothing; an unclosed one's are still counted."""
    return "" if match.group(1) else match.group()


def _walk(msg: Message) -> tuple[list[Message], set[int]]:
    """Leaf parts in document order, and the ids of those inside multipart/related.

    ``message/*`` parts are leaves (attachments).  The parser has already
    enforced the depth and part limits (:class:`_LimitedFeedParser`).
    Iterative, so the walk itself never recurses.
    """
    leaves: list[Message] = []
    related: set[int] = set()
    # (part, inside multipart/related, inside an attached message)
    stack: list[tuple[Message, bool, bool]] = [(msg, False, False)]
    while stack:
        part, in_related, attached = stack.pop()
        maintype = part.get_content_maintype()
        # is_multipart, not get_payload(): for a leaf with 8-bit content the latter
        # decodes with the declared charset, and a codec such as "idna" raises
        # (found by tests/test_message_fuzz.py).
        is_container = part.is_multipart()
        payload = part.get_payload() if is_container else None
        if not attached and (maintype != "multipart" or not is_container):
            leaves.append(part)
            if in_related:
                related.add(id(part))
        if is_container:
            child_related = in_related or part.get_content_type() == "multipart/related"
            child_attached = attached or maintype != "multipart"
            for child in reversed(payload):
                if isinstance(child, Message):
                    stack.append((child, child_related, child_attached))
    return leaves, related


def _decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode with the declared charset; never raises.

    Undeclared, us-ascii or unknown charsets: UTF-8 if the bytes are valid
    UTF-8 (the common mislabelling), else Latin-1, which maps every byte.
    """
    if charset and charset not in ("us-ascii", "ascii"):
        try:
            codec = codecs.lookup(charset).name
            if codec not in _BAD_CODECS:
                return data.decode(codec, errors="replace")
        except (LookupError, UnicodeError, ValueError):
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _decode_text(part: Message) -> str:
    """A text part's content as str, line endings normalised to ``\\n``."""
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        data = b""
    charset = part.get_content_charset()
    return _decode_bytes(data, charset).replace("\r\n", "\n")


def _attachment(part: Message, in_related: bool) -> Attachment:
    content_type = part.get_content_type()
    maintype = part.get_content_maintype()
    filename = _filename(part)
    if maintype == "message":
        content = _message_part_bytes(part)
        if filename is None and content_type == "message/rfc822":
            filename = "message.eml"
    elif maintype == "multipart":
        # A multipart the parser could not split (no or unmatched boundary).
        content_type = "application/octet-stream"
        content = _raw_payload_bytes(part)
    else:
        data = part.get_payload(decode=True)
        content = data if isinstance(data, bytes) else b""
    content_id = _content_id(part)
    disposition = part.get_content_disposition()
    # RFC 2392: a part with a Content-ID is referenced as cid:; it is inline when
    # it says so (RFC 2183) or lives in multipart/related (RFC 2387).
    inline = content_id is not None and (disposition == "inline" or in_related)
    return Attachment(
        filename=filename,
        content_type=content_type,
        content=content,
        content_id=content_id,
        inline=inline,
    )


def _filename(part: Message) -> str | None:
    """RFC 2183 filename (RFC 2231 / RFC 2047 decoded), else the Content-Type name."""
    try:
        name = part.get_filename()
        if name is None:
            name = part.get_param("name")
            if isinstance(name, tuple):  # undecoded RFC 2231 triple
                name = collapse_rfc2231_value(name)
    except Exception:  # noqa: BLE001 - stdlib parameter parsing; a filename is optional
        return None
    if not isinstance(name, str):
        return None
    name = _clean_text(name).strip()
    return name or None


def _content_id(part: Message) -> str | None:
    raw = part.get("content-id")
    if raw is None:
        return None
    value = _clean_text(str(raw)).strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    return value or None


def _message_part_bytes(part: Message) -> bytes:
    """Bytes of an attached message (RFC 2046 §5.2), re-serialised by the stdlib."""
    buffer = BytesIO()
    try:
        BytesGenerator(buffer, policy=_GENERATOR_POLICY).flatten(part)
        data = buffer.getvalue()
    except Exception:  # noqa: BLE001 - the stdlib generator chokes on some malformed trees
        # The text generator has no ASCII-only write step; encode what it makes.
        text = StringIO()
        try:
            Generator(text, policy=_GENERATOR_POLICY).flatten(part)
        except Exception:  # noqa: BLE001 - unrepresentable: keep the part, empty
            return b""
        data = text.getvalue().encode("utf-8", "surrogateescape")
    sep = data.find(b"\r\n\r\n")
    body = data[sep + 4 :] if sep >= 0 else b""
    # RFC 2046 forbids encoding message/rfc822, but clients do it.
    cte = str(part.get("content-transfer-encoding", "")).strip().lower()
    if cte == "base64":
        try:
            body = binascii.a2b_base64(body)
        except binascii.Error:
            pass
    elif cte == "quoted-printable":
        body = quopri.decodestring(body)
    return body


def _raw_payload_bytes(part: Message) -> bytes:
    """The undecoded body of a multipart the parser could not split (see :func:`_walk`
    on why not ``get_payload()``)."""
    data = part.get_payload(decode=True)
    return data if isinstance(data, bytes) else b""


def _clean_text(value: str) -> str:
    """Repair text from headers: undecodable bytes, embedded line breaks.

    The parser keeps raw 8-bit header bytes as surrogate escapes (RFC 6532
    UTF-8 headers arrive that way); decode them as UTF-8, else Latin-1.
    Line breaks that survive unfolding came from encoded words; they would
    allow header injection downstream, so they become spaces.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        data = value.encode("utf-8", "surrogateescape")
        try:
            value = data.decode("utf-8")
        except UnicodeDecodeError:
            value = data.decode("latin-1")
    if "\r" in value or "\n" in value or "\x00" in value:
        value = _LINE_BREAKS.sub(" ", value).replace("\x00", "")
    return value


def _unfold(value: str) -> str:
    """RFC 5322 §2.2.3 unfolding of a raw header value."""
    return _LINE_BREAKS.sub("", value).strip()


def _dense_encoded_words(value: str) -> bool:
    """True for a field with more than :data:`MAX_ENCODED_WORDS` RFC 2047 encoded words.

    CPython's header parser keeps, for every encoded word, a copy of the rest
    of the field (``email._header_value_parser.get_encoded_word`` sets
    ``ew.cte = value``): memory quadratic in the field, 100 MiB for a 60 KB
    Subject of short encoded words.  Such fields take the linear legacy decoder
    (:func:`_decode_words`), or are parsed without RFC 2047 decoding.
    """
    return value.count("=?") > MAX_ENCODED_WORDS


def _decode_words(value: str) -> str:
    """RFC 2047 decoding in linear time with the legacy ``email.header`` decoder."""
    try:
        chunks = decode_header(_unfold(value))
    except Exception:  # noqa: BLE001 - malformed beyond repair: keep the raw text
        return _unfold(value)
    return "".join(
        _decode_bytes(chunk, charset) if isinstance(chunk, bytes) else chunk for chunk, charset in chunks
    )


def _header_str(msg: Message, name: str, raw_value: str) -> str:
    """Decoded (RFC 2047), unfolded header value; raw value if decoding fails."""
    if _dense_encoded_words(raw_value):
        return _clean_text(_decode_words(raw_value)).strip()
    try:
        value = str(msg.policy.header_fetch_parse(name, raw_value))
    except Exception:  # noqa: BLE001 - stdlib header parser bugs: keep the raw text
        value = _unfold(raw_value)
    return _clean_text(value).strip()


def _first_header_str(msg: Message, name: str) -> str | None:
    for hname, value in msg.raw_items():
        if hname.lower() == name:
            return _header_str(msg, hname, value)
    return None


def _raw_header(msg: Message, name: str) -> str:
    for hname, value in msg.raw_items():
        if hname.lower() == name:
            return _clean_text(_unfold(value))
    return ""


def _message_id(msg: Message) -> str | None:
    value = _raw_header(msg, "message-id")
    match = _MSGID.search(value)
    if match:
        value = match.group(1).strip()
    return value or None


_FAST_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_FAST_ADDR = rf"{_FAST_ATOM}(?:\.{_FAST_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
# A display name of plain words: no quotes, comments, escapes or encoded words ("=?").
_FAST_WORD = r"[A-Za-z0-9!#$%&'*+/?^_`{|}~-]+"
_FAST_MAILBOX = re.compile(
    rf" ?(?:(?P<name>{_FAST_WORD}(?: {_FAST_WORD})*) <(?P<angle>{_FAST_ADDR})>|<(?P<bare_angle>{_FAST_ADDR})>|(?P<bare>{_FAST_ADDR})) ?"
)
_FOLD = re.compile(r"\r?\n(?=[ \t])")


def simple_mailboxes(value: str) -> list[tuple[str, str]] | None:
    """(display name, address) pairs when ``value`` is a plain mailbox list, else None.

    Covers what applications overwhelmingly send (``a@b``, ``<a@b>``,
    ``Name Surname <a@b>``, comma-separated) with the result the RFC 5322
    parser would give; anything else (quoted names, comments, groups, encoded
    words, obsolete syntax, non-ASCII) returns None and takes the full parser.
    The full parser costs about a tenth of a millisecond per header.
    """
    pairs = []
    for piece in _FOLD.sub("", value).split(","):
        match = _FAST_MAILBOX.fullmatch(piece)
        if match is None:
            return None
        address = match.group("angle") or match.group("bare_angle") or match.group("bare")
        pairs.append((match.group("name") or "", address))
    return pairs


def _addresses(msg: Message, name: str) -> tuple[EmailAddress, ...]:
    """All mailboxes of every ``name`` header, groups flattened (RFC 5322 §3.4)."""
    result: list[EmailAddress] = []
    for hname, raw_value in msg.raw_items():
        if hname.lower() != name:
            continue
        pairs: list[tuple[str, str]] | None = simple_mailboxes(raw_value)
        if pairs is not None:
            result.extend(EmailAddress(address, display) for display, address in pairs)
            continue
        try:
            if _dense_encoded_words(raw_value):
                raise ValueError("too many encoded words for the RFC 5322 parser")
            header = msg.policy.header_fetch_parse(hname, raw_value)
            pairs = [(a.display_name, a.addr_spec) for a in header.addresses]
        except Exception:  # noqa: BLE001 - stdlib header parser bugs: best effort below
            try:
                pairs = [
                    (_decode_words(display), addr) for display, addr in getaddresses([_unfold(raw_value)])
                ]
            except Exception:  # noqa: BLE001 - malformed beyond repair: no mailboxes
                pairs = []
        for display, addr in pairs:
            addr = _clean_text(addr or "").strip()
            if not addr or addr == "<>":
                continue
            result.append(EmailAddress(addr, _clean_text(display or "").strip()))
    return tuple(result)


def without_hidden_headers(raw: bytes) -> bytes:
    """``raw`` minus Bcc and control header fields, body untouched.

    The header block ends where the stdlib parser ends it: at the first line
    that is neither a field, a continuation line nor an mbox ``From `` line
    (``email.feedparser``).  A dropped field takes its continuation lines
    (RFC 5322 §2.2.3 folding) with it.
    """
    kept: list[bytes] = []
    dropped = False
    dropping = False
    pos = 0
    end = len(raw)
    while pos < end:
        match = _LINE.match(raw, pos)
        assert match is not None
        line = match.group()
        if not line or not _HEADER_LINE.match(line):
            break
        if line[:1] in (b" ", b"\t"):
            if dropping:
                dropped = True
            else:
                kept.append(line)
        else:
            colon = line.find(b":")
            name = (
                line[:colon].decode("ascii") if colon > 0 and not line.startswith(b"From ") else ""
            )
            dropping = bool(name) and (name.lower() in _RAW_DROP or is_control_header(name))
            if dropping:
                dropped = True
            else:
                kept.append(line)
        pos = match.end()
    if not dropped:
        return raw
    return b"".join(kept) + raw[pos:]


def text_to_html(text: str) -> str:
    """A minimal HTML document showing ``text`` the way plain text is shown.

    For providers that require an HTML body (the model leaves ``html`` None for
    text-only mail).  Markup is escaped; line breaks become ``<br>``; runs of
    spaces and leading indentation become ``&nbsp;`` and tabs expand to 4
    columns.  That is ``white-space: pre-wrap`` done in markup, because some
    clients (Outlook's Word engine) ignore the CSS property, and a CSS
    ``pre-wrap`` together with ``<br>`` would double every line break.  Long
    words may wrap.
    """
    rendered = []
    for line in _LINE_BREAKS.split(text):
        escaped = html.escape(line.expandtabs(4), quote=False)
        rendered.append(_SPACE_RUN.sub(lambda m: "&nbsp;" * len(m.group()), escaped))
    body = "<br>\n".join(rendered)
    return (
        "<!DOCTYPE html>\n"
        '<html><head><meta charset="utf-8"></head>\n'
        '<body><div style="word-wrap:break-word;overflow-wrap:anywhere">'
        f"{body}</div></body></html>\n"
    )
