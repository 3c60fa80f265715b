"""Downgrade an 8-bit message to 7-bit MIME for relays that need it.

mailgate advertises 8BITMIME (RFC 6152), so a client may send raw UTF-8 in
bodies (``Content-Transfer-Encoding: 8bit``) and, in practice, in headers.
Some raw-MIME destinations do not take that: Amazon SES asks that "any of the
MIME parts ... outside of the 7-bit ASCII character range" be encoded
(https://docs.aws.amazon.com/ses/latest/APIReference-V2/API_RawMessage.html),
and its open/click tracking garbles 8-bit parts.  RFC 6152 §3 describes the
conversion an MTA makes before relaying to a 7-bit server; this module makes it:

* a leaf part whose content is not ASCII gets ``quoted-printable`` (text) or
  ``base64`` (anything else); its decoded bytes and charset do not change;
* a ``message/*`` part declared ``8bit``/``binary`` becomes ``7bit`` once its
  own parts are converted (RFC 2046 §5.2.1 allows nothing else);
* a header holding raw 8-bit text (RFC 6532 style) is decoded as UTF-8 (else
  Latin-1, which maps every byte) and re-encoded as RFC 2047 encoded words
  (RFC 2231 for parameters).

Everything already 7-bit stays byte for byte as it was: ASCII input is returned
unchanged, and untouched header lines keep their original folding.
"""

from __future__ import annotations

import quopri
import re
from email import encoders
from email import policy as email_policy
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from io import BytesIO

__all__ = ["to_seven_bit"]

_PARSE_POLICY = email_policy.default.clone(linesep="\r\n")
# cte_type="7bit" makes the generator encode non-ASCII header objects (RFC 2047);
# refold_source="none" leaves every other header line exactly as it came.
_GENERATE_POLICY = email_policy.default.clone(linesep="\r\n", cte_type="7bit", refold_source="none")
_FOLD = re.compile(r"\r?\n(?=[ \t])")


def to_seven_bit(raw: bytes) -> bytes:
    """``raw`` with every 8-bit header and part encoded; ``raw`` itself when already ASCII.

    Never raises for odd input: a message the standard library cannot
    re-serialise is returned unchanged, for the destination to judge.
    """
    if raw.isascii():
        return raw
    try:
        message = BytesParser(policy=_PARSE_POLICY).parsebytes(raw)
        for part in message.walk():
            _encode_headers(part)
            _encode_body(part)
        buffer = BytesIO()
        BytesGenerator(buffer, policy=_GENERATE_POLICY).flatten(message)
    except Exception:  # noqa: BLE001 - stdlib parser/generator bugs: keep the original
        return raw
    return buffer.getvalue()


def _header_text(value: str) -> str:
    """A raw 8-bit header value (surrogate-escaped by the parser) as text, unfolded."""
    data = value.encode("ascii", "surrogateescape")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return _FOLD.sub("", text).strip()


def _encode_headers(part: Message) -> None:
    items = list(part.raw_items())  # type: ignore[attr-defined]
    if all(value.isascii() for _, value in items):
        return
    for name in {name.lower() for name, _ in items}:
        del part[name]
    for name, value in items:
        if not value.isascii():
            name, value = part.policy.header_store_parse(name, _header_text(value))
        part.set_raw(name, value)  # type: ignore[attr-defined]


def _encode_body(part: Message) -> None:
    encoding = str(part.get("content-transfer-encoding", "")).strip().lower()
    if part.is_multipart():
        if part.get_content_maintype() == "message" and encoding in ("8bit", "binary"):
            part.replace_header("Content-Transfer-Encoding", "7bit")
        return
    payload = part.get_payload()
    if not isinstance(payload, str) or payload.isascii():
        return
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        return
    del part["Content-Transfer-Encoding"]
    if part.get_content_maintype() == "text":
        # Line breaks stay line breaks (the generator writes CRLF); only the
        # 8-bit octets and trailing whitespace are escaped (RFC 2045 §6.7).
        part.set_payload(quopri.encodestring(data.replace(b"\r\n", b"\n")).decode("ascii"))
        part["Content-Transfer-Encoding"] = "quoted-printable"
    else:
        part.set_payload(data)
        encoders.encode_base64(part)
