"""``multipart/form-data`` bodies (RFC 7578), for APIs that take form posts.

Mailgun's messages API takes its fields and files this way.  The encoding
follows RFC 7578 and the HTML Living Standard's form submission algorithm,
which is what servers are tested against:

* every part has ``Content-Disposition: form-data; name="..."``; a file part
  adds ``filename="..."`` and its ``Content-Type`` (RFC 7578 §4.2, §4.4);
* in ``name`` and ``filename``, ``"`` CR and LF are percent-encoded
  (``%22 %0D %0A``), a backslash is written ``\\\\`` (the quoted-pair of
  RFC 2045's quoted-string, which parsers such as Go's and Python's undo),
  and other characters are sent as UTF-8, never as RFC 2231 ``filename*``
  (RFC 7578 §4.2 forbids it);
* text values are UTF-8 without a per-part ``Content-Type`` (RFC 7578 §4.4:
  the default is ``text/plain``), as browsers and curl send them;
* the boundary is random and checked against every part's content, so a part
  can never contain the delimiter (RFC 2046 §5.1.1).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["FormFile", "encode_form"]

_ESCAPES = str.maketrans({'"': "%22", "\r": "%0D", "\n": "%0A"})
_QUOTED = str.maketrans({'"': "%22", "\r": "%0D", "\n": "%0A", "\\": "\\\\"})


@dataclass(frozen=True)
class FormFile:
    """A file field: its name as the receiver sees it, media type and bytes."""

    filename: str
    content_type: str
    content: bytes = field(repr=False)


def random_boundary() -> str:
    return f"mailgate-{secrets.token_hex(16)}"


def _quoted(value: str) -> str:
    return '"' + value.translate(_QUOTED) + '"'


def encode_form(
    fields: Sequence[tuple[str, str | FormFile]],
    boundary: Callable[[], str] = random_boundary,
) -> tuple[bytes, str]:
    """The body for ``fields`` (in order; names may repeat) and its ``Content-Type``.

    ``boundary`` makes a candidate delimiter; tests inject a fixed one.  A
    candidate found inside any part is replaced, and one that keeps colliding
    (only possible with an injected constant) is an error.
    """
    parts: list[tuple[bytes, bytes]] = []
    for name, value in fields:
        disposition = f"Content-Disposition: form-data; name={_quoted(name)}"
        if isinstance(value, FormFile):
            content_type = value.content_type.translate(_ESCAPES)
            filename = _quoted(value.filename)
            head = f"{disposition}; filename={filename}\r\nContent-Type: {content_type}\r\n"
            parts.append((head.encode("utf-8"), value.content))
        else:
            parts.append((f"{disposition}\r\n".encode(), value.encode("utf-8")))
    for _ in range(8):
        delimiter = boundary()
        marker = b"--" + delimiter.encode("ascii")
        if not any(marker in head or marker in content for head, content in parts):
            break
    else:
        raise ValueError("no multipart boundary absent from the content")
    chunks: list[bytes] = []
    for head, content in parts:
        chunks += [marker, b"\r\n", head, b"\r\n", content, b"\r\n"]
    chunks += [marker, b"--\r\n"]
    return b"".join(chunks), f"multipart/form-data; boundary={delimiter}"
