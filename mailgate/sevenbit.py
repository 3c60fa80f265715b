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
* a header field holding raw 8-bit text (RFC 6532 style) is decoded as UTF-8
  (else Latin-1, which maps every byte) and re-encoded as RFC 2047 encoded
  words (RFC 2231 for parameters) by the standard library's folding.

It works on the bytes: the MIME tree is walked by boundary search (RFC 2046
§5.1.1), and every header field, boundary line and part that is already 7-bit
stays byte for byte as it was, so the cost is that of copying the message,
not of re-parsing and re-generating it (which takes seconds for a message of
ten megabytes, and runs on the reactor thread).  The preamble and epilogue of
a multipart, which no reader shows, are kept as they are.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from email import policy as email_policy

__all__ = ["to_seven_bit"]

_POLICY = email_policy.default.clone(linesep="\r\n")
# The blank line that ends a header block: group 1 ends the last field's line.
_HEADER_END = re.compile(rb"(\r?\n)(\r?\n)")
_FIELD_START = re.compile(rb"^(?=[^ \t\r\n])", re.MULTILINE)
_FOLDING = re.compile(r"\r?\n(?=[ \t])")
_MAX_DEPTH = 64


def to_seven_bit(raw: bytes) -> bytes:
    """``raw`` with every 8-bit header and part encoded; ``raw`` itself when already ASCII.

    Never raises for odd input: a message whose structure cannot be followed
    is returned unchanged, for the destination to judge.
    """
    if raw.isascii():
        return raw
    try:
        return _entity(raw, 0)
    except Exception:  # noqa: BLE001 - malformed beyond repair: keep the original
        return raw


def _entity(data: bytes, depth: int) -> bytes:
    """One MIME entity (a message or a body part), converted."""
    if data.isascii() or depth > _MAX_DEPTH:
        return data
    if data.startswith((b"\r\n", b"\n")):
        head, separator, body = b"", data[: data.index(b"\n") + 1], data[data.index(b"\n") + 1 :]
    elif (end := _HEADER_END.search(data)) is not None:
        head, separator, body = data[: end.end(1)], end.group(2), data[end.end() :]
    else:
        head, separator, body = data, b"", b""
    fields = [field for field in _FIELD_START.split(head) if field]
    content_type, params, encoding = _content_headers(fields)
    maintype = content_type.partition("/")[0]
    if maintype == "multipart" and params.get("boundary"):
        body = _multipart(body, params["boundary"].encode("ascii", "surrogateescape"), depth)
    elif maintype == "message":
        body = _entity(body, depth + 1)
        if encoding in ("8bit", "binary"):
            fields = _set_encoding(fields, "7bit")
    elif not body.isascii():
        body, new_encoding = _encode_leaf(body, encoding, maintype == "text")
        fields = _set_encoding(fields, new_encoding)
    return b"".join(_field_7bit(field) for field in fields) + separator + body


def _content_headers(fields: list[bytes]) -> tuple[str, dict[str, str], str]:
    """Media type (default text/plain, RFC 2045 §5.2), its parameters, and the transfer encoding."""
    content_type, params, encoding = "text/plain", {}, ""
    for field in fields:
        key, value = _name(field), field.partition(b":")[2]
        if key == b"content-type":
            header = _POLICY.header_factory("content-type", _text(value))
            content_type, params = header.content_type, dict(header.params)
        elif key == b"content-transfer-encoding":
            encoding = _text(value).lower()
    return content_type, params, encoding


def _name(field: bytes) -> bytes:
    return field.partition(b":")[0].strip().lower()


def _text(value: bytes) -> str:
    """A header value as text: UTF-8 if it is, else Latin-1; unfolded."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = value.decode("latin-1")
    return _FOLDING.sub("", text).strip()


def _field_7bit(field: bytes) -> bytes:
    """A header field as sent when ASCII, else refolded with RFC 2047 encoded words."""
    name, colon, value = field.partition(b":")
    if field.isascii() or not colon or not name.isascii():
        return field
    header = _POLICY.header_factory(name.decode("ascii").strip(), _text(value))
    return header.fold(policy=_POLICY).encode("ascii")


def _set_encoding(fields: list[bytes], encoding: str) -> list[bytes]:
    """``fields`` with their Content-Transfer-Encoding replaced by ``encoding``."""
    kept = [f for f in fields if _name(f) != b"content-transfer-encoding"]
    if kept and not kept[-1].endswith(b"\n"):
        kept[-1] += b"\r\n"  # a header block with no body after it
    return [*kept, f"Content-Transfer-Encoding: {encoding}\r\n".encode("ascii")]


def _encode_leaf(body: bytes, encoding: str, text: bool) -> tuple[bytes, str]:
    """An 8-bit leaf body in a 7-bit transfer encoding, and that encoding's name."""
    if encoding == "quoted-printable":
        data = binascii.a2b_qp(body)
    elif encoding == "base64":
        data = binascii.a2b_base64(body, strict_mode=False)
    else:  # 7bit (mislabelled), 8bit, binary, none, or unknown: the octets are the content
        data = body
    if text:
        # Line breaks stay line breaks; 8-bit octets and trailing whitespace are
        # escaped and long lines soft-broken (RFC 2045 §6.7).
        encoded = binascii.b2a_qp(data.replace(b"\r\n", b"\n"), quotetabs=False, istext=True)
        return encoded.replace(b"\n", b"\r\n"), "quoted-printable"
    return base64.encodebytes(data).replace(b"\n", b"\r\n"), "base64"


def _delimiters(body: bytes, boundary: bytes) -> Iterator[tuple[int, int, bool]]:
    """``(start, end, closing)`` of each delimiter line of a multipart body.

    A delimiter is ``--boundary`` at the start of a line, ``--`` after it for
    the last one, then optional whitespace; the line break before it belongs
    to it (RFC 2046 §5.1.1).  Found by literal search, which is what keeps a
    message of many megabytes fast.
    """
    marker = b"--" + boundary
    position = body.find(marker)
    while position >= 0:
        after = position + len(marker)
        closing = body.startswith(b"--", after)
        line_end = after + 2 if closing else after
        while line_end < len(body) and body[line_end] in b" \t":
            line_end += 1
        at_line_start = position == 0 or body[position - 1] == 0x0A  # "\n"
        if at_line_start and (line_end == len(body) or body[line_end] in b"\r\n"):
            start = position
            if start > 0:
                start -= 2 if body[start - 2 : start] == b"\r\n" else 1
            if body.startswith(b"\r\n", line_end):
                line_end += 2
            elif body.startswith(b"\n", line_end):
                line_end += 1
            yield start, line_end, closing
            if closing:
                return
        position = body.find(marker, after)


def _multipart(body: bytes, boundary: bytes, depth: int) -> bytes:
    """A multipart body with each body part converted; everything else kept as it is."""
    out: list[bytes] = []
    position = 0  # the end of what has been copied or converted
    opened = closed = False
    for start, end, closing in _delimiters(body, boundary):
        content = body[position:start]
        out.append(_entity(content, depth + 1) if opened else content)  # a part, or the preamble
        out.append(body[start:end])
        position, opened, closed = end, True, closing
    rest = body[position:]
    # After the close delimiter: the epilogue.  Without one, the last part runs to the end.
    out.append(_entity(rest, depth + 1) if opened and not closed else rest)
    return b"".join(out)
