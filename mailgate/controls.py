"""Control headers: per-message switches for provider features.

ARCHITECTURE.md §6 ("Control headers"): a client that can only speak SMTP has no
way to pass API options such as a tag, a message stream or tracking flags, so
it sets special headers instead.  mailgate reads them into
:class:`mailgate.model.Controls` and removes them before forwarding, the way
the providers' own SMTP endpoints do (Postmark, Mailgun and SMTPeter all strip
their ``X-`` headers before delivery).

Canonical names are ``X-Mailgate-*``.  Vendor aliases are accepted so that
applications already configured for a provider's SMTP endpoint keep working
when pointed at mailgate:

* Postmark, https://postmarkapp.com/developer/user-guide/send-email-with-smtp :
  ``X-PM-Tag``, ``X-PM-Metadata-<key>``, ``X-PM-Message-Stream``,
  ``X-PM-KeepID``, ``X-PM-TrackOpens``, ``X-PM-TrackLinks`` (values ``None``,
  ``HtmlAndText``, ``HtmlOnly``, ``TextOnly``: ``track_clicks`` says on or off,
  ``track_links_mode`` keeps the mode for adapters that can honour it).
* Mailgun, https://documentation.mailgun.com/docs/mailgun/user-manual/sending-messages/pass-sending-options :
  ``X-Mailgun-Tag`` ("setting multiple X-Mailgun-Tag headers" gives several
  tags) and ``X-Mailgun-Variables`` (a JSON object of user variables).
* SendGrid, https://www.twilio.com/docs/sendgrid/for-developers/sending-email/building-an-x-smtpapi-header :
  ``X-SMTPAPI``, a JSON object kept verbatim for the SendGrid adapter.
* SMTPeter, https://www.smtpeter.com/en/documentation/smtp-headers :
  ``X-SMTPeter-InlineCSS``, ``-TrackClicks``, ``-TrackOpens`` ("when set to
  true") and ``-TrackBounces`` (accepted and stripped; no model field).
* Bento: ``X-Bento-Transactional`` and ``X-Bento-Layout-Id``
  (ARCHITECTURE.md §6).

Rules (decided here, tested in tests/test_controls.py):

* Header names are case-insensitive (RFC 5322 §1.2.2).
* Booleans: ``true``/``1``/``yes`` and ``false``/``0``/``no``, any case
  (ARCHITECTURE.md §6).  Any other value is ignored, as if the header were
  absent, so a typo never turns into a crash or a silent ``False``.
* Tags: every tag header contributes one tag (a value containing commas is
  still one tag: Postmark has a single tag per message); tags are deduplicated
  keeping the first occurrence.
* Metadata: one entry per ``X-Mailgate-Metadata-<key>`` / ``X-PM-Metadata-<key>``
  header and per member of an ``X-Mailgun-Variables`` object (non-string JSON
  values are re-serialised as compact JSON).  Keys are compared
  case-insensitively (they come from header names, which are); the first
  value for a key wins.
* Single-valued controls (stream, tracking, ...): the canonical
  ``X-Mailgate-*`` header wins over a vendor alias; among headers of the same
  rank the first valid one wins.
* Account defaults (``Account.defaults``, keyed by canonical header name) fill
  in only the controls that the message leaves unset; for metadata this is per
  key.

Every control header, including one whose value is ignored, is removed before
forwarding: :func:`is_control_header` is the single test used for that.  The
whole ``X-Mailgate-`` namespace is treated as control headers so that a
misspelt control never leaks to recipients.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping

from mailgate.model import Controls

__all__ = [
    "MAX_JSON_LENGTH",
    "MAX_METADATA",
    "MAX_TAGS",
    "MAX_VALUE_LENGTH",
    "extract_controls",
    "is_control_header",
    "parse_bool",
]

#: At most this many tags are kept; later ones are ignored.  Generous next to
#: what providers accept (Postmark 1, Mailgun 3, SendGrid 10 categories): the
#: adapters enforce their provider's own limit.
MAX_TAGS = 20
#: At most this many metadata entries are kept; later ones are ignored.
MAX_METADATA = 50
#: Tag, metadata key/value, stream and layout values longer than this (in
#: characters) are ignored rather than truncated: a truncated tag or value is
#: a different value and would silently mislabel the message.  Postmark allows
#: 1000-character tags, the longest of the providers.
MAX_VALUE_LENGTH = 1000
#: ``X-SMTPAPI`` and ``X-Mailgun-Variables`` values longer than this are
#: ignored, which also bounds JSON decoding work.
MAX_JSON_LENGTH = 10_000

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
# Postmark X-PM-TrackLinks: "None" disables, any other mode enables.
_POSTMARK_LINK_MODES = {"none": False, "htmlandtext": True, "htmlonly": True, "textonly": True}
# The same modes as Postmark spells them, kept in Controls.track_links_mode.
_POSTMARK_LINK_SPELLING = {
    "none": "None",
    "htmlandtext": "HtmlAndText",
    "htmlonly": "HtmlOnly",
    "textonly": "TextOnly",
}

# Kinds of control header.
_TAG = "tag"
_BOOL = "bool"
_LINKS = "links"  # Postmark link tracking modes, or a boolean
_TEXT = "text"
_VARIABLES = "variables"  # X-Mailgun-Variables JSON object
_SMTPAPI = "smtpapi"
_IGNORED = "ignored"  # understood and stripped, no model field

# Rank 0 = canonical (wins), 1 = vendor alias.
_CANONICAL, _ALIAS = 0, 1

# lower-case header name -> (Controls field, kind, rank)
_HEADERS: dict[str, tuple[str, str, int]] = {
    "x-mailgate-tag": ("tags", _TAG, _CANONICAL),
    "x-mailgate-stream": ("stream", _TEXT, _CANONICAL),
    "x-mailgate-track-opens": ("track_opens", _BOOL, _CANONICAL),
    "x-mailgate-track-clicks": ("track_clicks", _BOOL, _CANONICAL),
    "x-mailgate-transactional": ("transactional", _BOOL, _CANONICAL),
    "x-mailgate-layout": ("layout", _TEXT, _CANONICAL),
    "x-mailgate-inline-css": ("inline_css", _BOOL, _CANONICAL),
    "x-mailgate-keep-message-id": ("keep_message_id", _BOOL, _CANONICAL),
    # Postmark
    "x-pm-tag": ("tags", _TAG, _ALIAS),
    "x-pm-message-stream": ("stream", _TEXT, _ALIAS),
    "x-pm-keepid": ("keep_message_id", _BOOL, _ALIAS),
    "x-pm-trackopens": ("track_opens", _BOOL, _ALIAS),
    "x-pm-tracklinks": ("track_clicks", _LINKS, _ALIAS),
    # Bento
    "x-bento-transactional": ("transactional", _BOOL, _ALIAS),
    "x-bento-layout-id": ("layout", _TEXT, _ALIAS),
    # SMTPeter
    "x-smtpeter-inlinecss": ("inline_css", _BOOL, _ALIAS),
    "x-smtpeter-trackclicks": ("track_clicks", _BOOL, _ALIAS),
    "x-smtpeter-trackopens": ("track_opens", _BOOL, _ALIAS),
    "x-smtpeter-trackbounces": ("", _IGNORED, _ALIAS),
    # Mailgun
    "x-mailgun-tag": ("tags", _TAG, _ALIAS),
    "x-mailgun-variables": ("metadata", _VARIABLES, _ALIAS),
    # SendGrid
    "x-smtpapi": ("smtpapi", _SMTPAPI, _ALIAS),
}

# Metadata header prefixes (lower case).
_METADATA_PREFIXES = ("x-mailgate-metadata-", "x-pm-metadata-")
_RESERVED_PREFIX = "x-mailgate-"

_LINE_BREAKS = re.compile(r"\r\n|\r|\n")


def is_control_header(name: str) -> bool:
    """True when a header named ``name`` is a control header and must not be forwarded.

    Covers every canonical and vendor name above, any ``*-Metadata-*`` header of
    those families, and the whole reserved ``X-Mailgate-`` namespace.
    """
    key = name.strip().lower()
    return key in _HEADERS or key.startswith((_RESERVED_PREFIX, "x-pm-metadata-"))


def parse_bool(value: str) -> bool | None:
    """``True``/``False`` for the accepted spellings (any case), ``None`` for anything else."""
    folded = value.strip().lower()
    if folded in _TRUE:
        return True
    if folded in _FALSE:
        return False
    return None


def _clean(value: str) -> str:
    """Unfold (RFC 5322 §2.2.3: remove line breaks) and trim surrounding whitespace."""
    return _LINE_BREAKS.sub("", value).strip()


class _Collector:
    """Accumulates control values from one source (message headers or defaults)."""

    def __init__(self) -> None:
        self.tags: list[str] = []
        self._tag_set: set[str] = set()
        self.metadata: list[tuple[str, str]] = []
        self._metadata_keys: set[str] = set()
        # field -> (rank, value); lower rank wins, then earlier.
        self.scalars: dict[str, tuple[int, object]] = {}

    def add_tag(self, tag: str) -> None:
        if not tag or len(tag) > MAX_VALUE_LENGTH or tag in self._tag_set:
            return
        if len(self.tags) >= MAX_TAGS:
            return
        self._tag_set.add(tag)
        self.tags.append(tag)

    def add_metadata(self, key: str, value: str) -> None:
        key = key.strip()
        if not key or len(key) > MAX_VALUE_LENGTH or len(value) > MAX_VALUE_LENGTH:
            return
        folded = key.lower()
        if folded in self._metadata_keys or len(self.metadata) >= MAX_METADATA:
            return
        self._metadata_keys.add(folded)
        self.metadata.append((key, value))

    def set_scalar(self, field: str, rank: int, value: object) -> None:
        current = self.scalars.get(field)
        if current is None or rank < current[0]:
            self.scalars[field] = (rank, value)

    def add_header(self, name: str, raw_value: str) -> None:
        key = name.strip().lower()
        value = _clean(raw_value)
        for prefix in _METADATA_PREFIXES:
            if key.startswith(prefix):
                # Keep the key as spelt in the header (minus the prefix).
                self.add_metadata(name.strip()[len(prefix) :], value)
                return
        spec = _HEADERS.get(key)
        if spec is None:
            return
        field, kind, rank = spec
        if kind == _TAG:
            self.add_tag(value)
        elif kind == _BOOL:
            flag = parse_bool(value)
            if flag is not None:
                self.set_scalar(field, rank, flag)
        elif kind == _LINKS:
            flag = _POSTMARK_LINK_MODES.get(value.lower())
            if flag is None:
                flag = parse_bool(value)
            else:
                self.set_scalar("track_links_mode", rank, _POSTMARK_LINK_SPELLING[value.lower()])
            if flag is not None:
                self.set_scalar(field, rank, flag)
        elif kind == _TEXT:
            if value and len(value) <= MAX_VALUE_LENGTH:
                self.set_scalar(field, rank, value)
        elif kind == _VARIABLES:
            for var_key, var_value in _json_object_items(value) or ():
                if not isinstance(var_value, str):
                    var_value = json.dumps(var_value, separators=(",", ":"), ensure_ascii=False)
                self.add_metadata(var_key, var_value)
        elif kind == _SMTPAPI and _json_object_items(value) is not None:
            self.set_scalar(field, rank, value)
        # _IGNORED: nothing to record.


def _json_object_items(value: str) -> list[tuple[str, object]] | None:
    """Members of a JSON object, or None when ``value`` is not one (or is too long).

    A ``None`` result means the header is ignored; never raises.
    """
    if not value or len(value) > MAX_JSON_LENGTH:
        return None
    try:
        decoded = json.loads(value)
    except (ValueError, RecursionError):
        return None
    if not isinstance(decoded, dict):
        return None
    return list(decoded.items())


def extract_controls(
    headers: Iterable[tuple[str, str]], defaults: Mapping[str, str] = {}
) -> Controls:
    """Read the control headers among ``headers`` and apply account ``defaults``.

    ``headers`` are ``(name, value)`` pairs in message order, values already
    decoded (RFC 2047) by the caller; non-control headers are skipped.
    ``defaults`` are the account's defaults keyed by header name (canonical
    names are documented; aliases work too), each one applied only when the
    message sets no valid value for that control (per key for metadata).
    Never raises on odd values: an unusable value is ignored.
    """
    found = _Collector()
    for name, value in headers:
        if is_control_header(name):
            found.add_header(name, value)

    if defaults:
        fallback = _Collector()
        for name, value in defaults.items():
            fallback.add_header(name, value)
        if not found.tags:
            for tag in fallback.tags:
                found.add_tag(tag)
        for key, value in fallback.metadata:
            found.add_metadata(key, value)
        for field, (_rank, value) in fallback.scalars.items():
            if field not in found.scalars:
                found.scalars[field] = (_ALIAS, value)

    scalars = {field: value for field, (_rank, value) in found.scalars.items()}
    return Controls(tags=tuple(found.tags), metadata=tuple(found.metadata), **scalars)
