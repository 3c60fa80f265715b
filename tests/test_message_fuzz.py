"""Property tests of the MIME mapping over generated MIME trees (mailgate/message.py).

Messages are built as bytes from random trees of parts with random headers,
encodings and charsets (well-formed or not), so the parser meets what clients
really send and what attackers craft:

* nothing but :class:`MessageParseError` ever escapes, and never by accident
  (no wrapped exception);
* a Bcc or Resent-Bcc header never leaks: not in ``raw``, not in ``headers``,
  not among the addresses;
* recipients are always the envelope: every envelope recipient is in To, Cc
  or Bcc, and Bcc holds only envelope recipients that are in neither;
* the structural limits hold exactly: a well-formed tree is refused if and
  only if it is deeper or has more parts than :class:`MimeLimits` allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgate.message import DEFAULT_LIMITS, MessageParseError, MimeLimits, parse_message

HIDDEN = "hidden.person@bcc.example"
LOCAL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.", min_size=1, max_size=6).filter(
    lambda s: not s.startswith(".") and not s.endswith(".") and ".." not in s
)
ADDRESS = st.builds(lambda local, domain: f"{local}@{domain}.example", LOCAL, st.sampled_from(["a", "b", "c"]))
DISPLAY = st.sampled_from(["", "Bob", '"Doe, J"', "=?utf-8?q?J=C3=B6rg?=", "(comment)", '"a\\"b"'])
HEADER_VALUE = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60),
    st.sampled_from(
        [
            "=?utf-8?q?caf=C3=A9?=",
            "=?utf-8?b?4pyT?= tick",
            "=?bogus?q?x?=",
            "=?utf-8?q?a=0D=0AInjected:_yes?=",
            "=?idna?q?xn--bcher-kva?=",
            "=?utf-8?q?unterminated",
            "(((((",
            '"unbalanced',
            "a\r\n folded",
        ]
    ),
)
OTHER_HEADER = st.tuples(
    st.sampled_from(["X-Custom", "Subject", "Reply-To", "X-PM-Tag", "X-Mailgate-Tag", "Sender", "Comments", "Date"]),
    HEADER_VALUE,
)
CHARSET = st.sampled_from(["utf-8", "us-ascii", "iso-8859-1", "bogus", "idna", "utf-16", "x-unknown", ""])
LEAF_BODY = st.sampled_from(
    [
        ("7bit", b"plain text\r\n"),
        ("8bit", "Grüße ✓\r\n".encode()),
        ("base64", b"SGVsbG8=\r\n"),
        ("base64", b"!!!not base64===\r\n"),
        ("quoted-printable", b"caf=C3=A9 =\r\nsoft=ZZ\r\n"),
        ("x-unknown", b"\xff\xfe\x00junk\r\n"),
    ]
)


@dataclass
class Part:
    content_type: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    encoding: str = "7bit"
    children: list[Part] = field(default_factory=list)

    def depth(self) -> int:
        return 1 + max((child.depth() for child in self.children), default=-1) if self.children else 0

    def count(self) -> int:
        return 1 + sum(child.count() for child in self.children)

    def render(self, boundary_seed: int = 0) -> bytes:
        lines = [f"{name}: {value}".encode("utf-8", "surrogateescape") for name, value in self.headers]
        if self.children and self.content_type.startswith("multipart/"):
            boundary = f"=_b{boundary_seed}_{id(self) % 10**6}"
            lines.append(f'Content-Type: {self.content_type}; boundary="{boundary}"'.encode())
            out = b"\r\n".join(lines) + b"\r\n\r\n"
            for index, child in enumerate(self.children):
                out += f"--{boundary}\r\n".encode() + child.render(boundary_seed * 31 + index + 1) + b"\r\n"
            return out + f"--{boundary}--\r\n".encode()
        if self.children:  # message/rfc822
            lines.append(f"Content-Type: {self.content_type}".encode())
            return b"\r\n".join(lines) + b"\r\n\r\n" + self.children[0].render(boundary_seed + 7)
        lines.append(f"Content-Type: {self.content_type}".encode())
        lines.append(f"Content-Transfer-Encoding: {self.encoding}".encode())
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.body


@st.composite
def leaf(draw: st.DrawFn) -> Part:
    maintype = draw(st.sampled_from(["text/plain", "text/html", "application/pdf", "image/png", "text/calendar"]))
    charset = draw(CHARSET)
    content_type = f"{maintype}; charset={charset}" if charset else maintype
    encoding, body = draw(LEAF_BODY)
    headers = []
    if draw(st.booleans()):
        name = draw(st.sampled_from(["r.pdf", "=?utf-8?q?r=C3=A9sum=C3=A9.pdf?=", "../../etc/passwd", ""]))
        kind = draw(st.sampled_from(["attachment", "inline", "bogus"]))
        headers.append(("Content-Disposition", f'{kind}; filename="{name}"'))
    if draw(st.booleans()):
        headers.append(("Content-ID", draw(st.sampled_from(["<img1@x>", "img2", "<>", "<a b>"]))))
    return Part(content_type, headers, body, encoding)


def trees(max_leaves: int = 12) -> st.SearchStrategy[Part]:
    return st.recursive(
        leaf(),
        lambda children: st.one_of(
            st.builds(
                lambda kind, parts: Part(f"multipart/{kind}", children=parts),
                st.sampled_from(["mixed", "alternative", "related", "digest", "x-unknown"]),
                st.lists(children, min_size=1, max_size=4),
            ),
            st.builds(lambda inner: Part("message/rfc822", children=[inner]), children),
        ),
        max_leaves=max_leaves,
    )


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, list[str], Part]:
    to = draw(st.lists(st.tuples(DISPLAY, ADDRESS), max_size=3))
    cc = draw(st.lists(st.tuples(DISPLAY, ADDRESS), max_size=3))
    envelope = draw(st.lists(ADDRESS, max_size=3)) + [a for _, a in to + cc if draw(st.booleans())]
    envelope = [a.upper() if draw(st.booleans()) else a for a in draw(st.permutations(envelope))]
    if not envelope:
        envelope = ["someone@c.example"]

    def mailbox_list(pairs: list[tuple[str, str]]) -> str:
        return ", ".join(f"{name} <{address}>" if name else address for name, address in pairs)

    top: list[tuple[str, str]] = [("From", "Alice <alice@a.example>")]
    if to:
        top.append(("To", mailbox_list(to)))
    if cc:
        top.append(("Cc", mailbox_list(cc)))
    for name in draw(st.lists(st.sampled_from(["Bcc", "Resent-Bcc", "bcc", "BCC"]), max_size=2)):
        top.append((name, f"Hidden <{HIDDEN}>,\r\n other.{HIDDEN}"))
    top.extend(draw(st.lists(OTHER_HEADER, max_size=4)))
    top = draw(st.permutations(top))
    tree = draw(trees())
    tree.headers = list(top) + tree.headers
    return tree.render(), envelope, tree


def _parse(raw: bytes, envelope: list[str], limits: MimeLimits = DEFAULT_LIMITS) -> Any:
    try:
        return parse_message(raw, "alice@a.example", envelope, limits=limits)
    except MessageParseError as exc:
        assert exc.__cause__ is None, f"an unexpected exception was wrapped: {exc.__cause__!r}"
        return exc


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(messages())
def test_bcc_never_leaks_and_recipients_are_the_envelope(case: tuple[bytes, list[str], Part]) -> None:
    """Bcc headers vanish everywhere; To ∪ Cc ∪ Bcc covers the envelope; Bcc = envelope minus To/Cc."""
    raw, envelope, _ = case
    result = _parse(raw, envelope)
    if isinstance(result, MessageParseError):
        return
    assert HIDDEN not in result.raw.decode("utf-8", "surrogateescape").split("\r\n\r\n", 1)[0]
    for name, value in result.headers:
        assert name.lower() not in ("bcc", "resent-bcc") and HIDDEN not in value
    shown = [a.address.lower() for a in (*result.to, *result.cc, *result.reply_to)]
    assert all(HIDDEN not in address for address in shown)
    assert list(result.envelope_recipients) == envelope
    in_headers = {a.address.lower() for a in (*result.to, *result.cc)}
    bcc = [a.address for a in result.bcc]
    assert {r.lower() for r in envelope} <= in_headers | {b.lower() for b in bcc}
    assert all(b.lower() not in in_headers for b in bcc)
    assert {b.lower() for b in bcc} <= {r.lower() for r in envelope}
    assert len({b.lower() for b in bcc}) == len(bcc)


@FUZZ
@given(messages(), st.integers(min_value=0, max_value=5), st.integers(min_value=1, max_value=30))
def test_structure_limits_hold_exactly(case: tuple[bytes, list[str], Part], depth: int, parts: int) -> None:
    """A generated tree is refused exactly when it is deeper, or has more parts, than allowed."""
    raw, envelope, tree = case
    result = _parse(raw, envelope, MimeLimits(max_depth=depth, max_parts=parts))
    too_big = tree.depth() > depth or tree.count() > parts
    assert isinstance(result, MessageParseError) == too_big, (tree.depth(), tree.count(), result)


@FUZZ
@given(
    st.lists(st.tuples(st.sampled_from([b"To", b"Cc", b"Subject", b"X-A", b"Content-Type", b"Bcc"]), st.binary(max_size=80)), max_size=8),
    st.binary(max_size=300),
)
def test_arbitrary_header_bytes_never_crash(headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """Any header bytes (NUL, 8-bit, lone CR/LF, encoded-word fragments) give a model or
    a deliberate MessageParseError, and the Bcc header is still gone."""
    raw = b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n" + body
    result = _parse(raw, ["r@c.example"])
    if not isinstance(result, MessageParseError):
        assert all(name.lower() != "bcc" for name, _ in result.headers)
        assert result.envelope_recipients == ("r@c.example",)
