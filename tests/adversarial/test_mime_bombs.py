"""MIME bombs (SECURITY.md): structures that would make the parser slow, deep or huge.

Limits (defaults): 32 levels, 1000 parts, 256 KiB per header block, 64 KiB per
header field, 500 fields per block, 1000 addresses per header name.  Each bomb
gets 554 5.6.0 (structure) or 552 5.3.4 (size) after the final dot, and the
parse is stopped before the expensive work (mailgate/message.py); messages
that are merely odd are delivered once.
"""

from __future__ import annotations

import threading

import pytest
import pytest_twisted

from mailgate.message import MAX_FIELD_SIZE

from .invariants import Invariants

HEAD = b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: bomb\r\nMIME-Version: 1.0\r\n"


def nested_multipart(depth: int, filler: bytes = b"x\r\n") -> bytes:
    opening = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(depth))
    closing = b"".join(b"--b%d--\r\n" % i for i in reversed(range(depth)))
    return HEAD + opening + b"Content-Type: text/plain\r\n\r\n" + filler + closing


def multipart(parts: list[bytes]) -> bytes:
    body = b"".join(b"--b\r\n" + part for part in parts)
    return HEAD + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + body + b"--b--\r\n"


def folded(items: list[bytes], separator: bytes, per_line: int = 50) -> bytes:
    lines = [separator.join(items[i : i + per_line]) for i in range(0, len(items), per_line)]
    return (separator + b"\r\n ").join(lines)


def wrap(value: bytes, width: int = 900) -> bytes:
    """Fold a long header value into continuation lines (RFC 5322 §2.2.3 form)."""
    return b"\r\n ".join(value[i : i + width] for i in range(0, len(value), width))


BOMBS = {
    "multipart-1000-deep": (nested_multipart(1000), "554 5.6.0 Message could not be parsed: MIME parts nested deeper than 32 levels"),
    "rfc822-1000-deep": (
        HEAD + b"Content-Type: message/rfc822\r\n\r\n" * 1000 + b"x\r\n",
        "554 5.6.0 Message could not be parsed: MIME parts nested deeper than 32 levels",
    ),
    "digest-1000-deep": (
        HEAD + b"".join(b"Content-Type: multipart/digest; boundary=d%d\r\n\r\n--d%d\r\n" % (i, i) for i in range(1000)) + b"\r\nx\r\n",
        "554 5.6.0 Message could not be parsed: MIME parts nested deeper than 32 levels",
    ),
    "parts-2000": (
        multipart([b"Content-Type: text/plain\r\n\r\nx\r\n"] * 2000),
        "554 5.6.0 Message could not be parsed: message has more than 1000 MIME parts",
    ),
    "empty-parts-5000": (multipart([b"\r\n"] * 5000), "554 5.6.0 Message could not be parsed: message has more than 1000 MIME parts"),
    "header-field-600k": (
        HEAD + b"X-Big: start\r\n" + (b" " + b"a" * 900 + b"\r\n") * 650 + b"\r\nbody\r\n",
        f"552 5.3.4 Message size exceeds fixed maximum message size: header field larger than {MAX_FIELD_SIZE} octets",
    ),
    "header-block-300k": (
        HEAD + b"".join(b"X-F%d: " % i + b"v" * 990 + b"\r\n" for i in range(300)) + b"\r\nbody\r\n",
        "552 5.3.4 Message size exceeds fixed maximum message size: header block larger than 262144 octets",
    ),
    "header-count-600": (
        HEAD + b"".join(b"X-H%d: v\r\n" % i for i in range(600)) + b"\r\nbody\r\n",
        "554 5.6.0 Message could not be parsed: more than 500 header fields in one block",
    ),
    "received-600": (
        b"".join(b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n" for _ in range(600)) + HEAD + b"\r\nx\r\n",
        "554 5.6.0 Message could not be parsed: more than 500 header fields in one block",
    ),
    "part-header-block-300k": (
        multipart([b"".join(b"X-P%d: " % i + b"p" * 990 + b"\r\n" for i in range(300)) + b"\r\nx\r\n"]),
        "552 5.3.4 Message size exceeds fixed maximum message size: header block larger than 262144 octets",
    ),
    "to-10000-addresses": (
        b"From: alice@example.com\r\nTo: " + folded([b"a@b.c"] * 10000, b",", 150) + b"\r\n\r\nx\r\n",
        "554 5.6.0 Message could not be parsed: To header has more than 1000 addresses",
    ),
    "ten-to-fields-of-200": (
        b"From: alice@example.com\r\n" + b"To: " + folded([b"a@b.c"] * 200, b",") + b"\r\n" * 1 + (b"To: " + folded([b"a@b.c"] * 200, b",") + b"\r\n") * 9 + b"\r\nx\r\n",
        "554 5.6.0 Message could not be parsed: To header has more than 1000 addresses",
    ),
    "cc-groups-2000": (
        b"From: alice@example.com\r\nTo: bob@example.org\r\nCc: " + folded([b"g: a@b.c;"] * 2000, b" ", 60) + b"\r\n\r\nx\r\n",
        "554 5.6.0 Message could not be parsed: Cc header has more than 1000 addresses",
    ),
    "empty-lines-520k": (
        HEAD + b"\r\n" * 520000,
        "552 5.3.4 Message size exceeds fixed maximum message size: message has more than 500000 lines",
    ),
    "disposition-parameters-20x3500": (
        multipart(
            [
                b"Content-Type: application/octet-stream\r\nContent-Disposition: attachment"
                + wrap(b"".join(b"; p%d=v" % i for i in range(3500)))
                + b"\r\n\r\nx\r\n"
            ]
            * 20
        ),
        "554 5.6.0 Message could not be parsed: a Content-* header field has more than 100 parameters",
    ),
    "top-content-type-parameters-3500": (
        HEAD + b"Content-Type: text/plain" + wrap(b"".join(b'; p%d="v"' % i for i in range(3500))) + b"\r\n\r\nx\r\n",
        "554 5.6.0 Message could not be parsed: a Content-* header field has more than 100 parameters",
    ),
    "rfc2231-continuations-3000": (
        multipart(
            [b"\r\nhi\r\n", b"Content-Disposition: attachment; " + folded([b"filename*%d=a" % i for i in range(3000)], b"; ", 40) + b"\r\n\r\nd\r\n"]
        ),
        "554 5.6.0 Message could not be parsed: a Content-* header field has more than 100 parameters",
    ),
    "content-type-params-4000": (
        multipart(
            [b"\r\nhi\r\n", b"Content-Type: application/x; " + folded([b"p%d=v" % i for i in range(4000)], b"; ", 60) + b"\r\n\r\nd\r\n"]
        ),
        "554 5.6.0 Message could not be parsed: a Content-* header field has more than 100 parameters",
    ),
    "parse-work": (
        nested_multipart(40, b"x\r\n" * 340000),
        "554 5.6.0 Message could not be parsed: MIME structure too complex for the message size",
    ),
}


@pytest.mark.parametrize("name", list(BOMBS))
@pytest_twisted.ensureDeferred
async def test_bomb_is_refused(inv: Invariants, role: str, name: str) -> None:
    """Each bomb is answered with its precise 554 5.6.0 / 552 5.3.4; nothing is delivered
    and the session takes the next message."""
    bomb, reply = BOMBS[name]

    def attack() -> tuple[str, str]:
        client = inv.client(role)
        client.prepare()
        return client.message(bomb), client.message()

    refused, after = await inv.attack(attack)
    assert refused == reply
    assert after.startswith("250 ")
    await inv.check(delivered=1, role=role)


ODD_BUT_FINE = {
    "quoted-names-with-commas-900": b"From: alice@example.com\r\nTo: "
    + folded([b'"Doe, J%d" <j%d@example.org>' % (i, i) for i in range(900)], b",", 20)
    + b"\r\n\r\nx\r\n",
    "encoded-word-subject-60k": HEAD.replace(b"Subject: bomb", b"Subject: " + folded([b"=?utf-8?b?YQ==?="] * 3500, b" ", 50)) + b"\r\nx\r\n",
    "nested-comments-from": b"From: " + wrap(b"(" * 3000 + b"c" + b")" * 3000) + b" alice@example.com\r\nTo: bob@example.org\r\n\r\nx\r\n",
    "unclosed-comment-from": b"From: " + wrap(b"(" * 3000) + b" alice@example.com\r\nTo: bob@example.org\r\n\r\nx\r\n",
    "base64-garbage-700k": multipart(
        [b"\r\nhi\r\n", b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n" + b"!!!!====\x7f\x7f\r\n" * 70000]
    ),
    "base64-900-attachments": multipart(
        [b"\r\nhi\r\n"] + [b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\nQUJD\r\n"] * 900
    ),
    "quoted-printable-soft-breaks": multipart(
        [b"\r\nhi\r\n", b"Content-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n" + b"=\r\n" * 200000]
    ),
    "boundary-980-octets": HEAD
    + b'Content-Type: multipart/mixed;\r\n boundary="'
    + b"z" * 980
    + b'"\r\n\r\n--'
    + b"z" * 980
    + b"\r\n\r\nhi\r\n--"
    + b"z" * 980
    + b"--\r\n",
    "multipart-without-boundary": HEAD + b"Content-Type: multipart/mixed\r\n\r\n--x\r\n\r\nhi\r\n--x--\r\n",
    "nested-32-levels": nested_multipart(32),
    # CPython's RFC 2047 parser keeps a copy of the rest of the field per encoded word
    # (quadratic memory); these would take 100+ MiB without the linear fallback.
    "to-999-encoded-names": b"From: alice@example.com\r\nTo: "
    + folded([b"=?utf-8?q?N=C3=A9?= <u%d@example.org>" % i for i in range(999)], b",", 20)
    + b"\r\n\r\nx\r\n",
    "filename-3500-encoded-words": multipart(
        [b"\r\nhi\r\n", b'Content-Disposition: attachment; filename="' + folded([b"=?utf-8?b?YQ==?="] * 3500, b" ") + b'"\r\n\r\nd\r\n']
    ),
    "four-fields-of-encoded-words": HEAD + (b"X-Words: " + folded([b"=?utf-8?b?YQ==?="] * 3500, b" ") + b"\r\n") * 4 + b"\r\nx\r\n",
}


@pytest.mark.parametrize("name", list(ODD_BUT_FINE))
@pytest_twisted.ensureDeferred
async def test_odd_but_acceptable_message_is_delivered_once(inv: Invariants, role: str, name: str) -> None:
    """Strange but bounded structures (at the limits, malformed encodings, many
    parameters) are delivered exactly once, without a parser error."""

    def attack() -> str:
        client = inv.client(role)
        client.prepare()
        return client.message(ODD_BUT_FINE[name])

    assert (await inv.attack(attack)).startswith("250 ")
    await inv.check(delivered=1, role=role)


@pytest_twisted.ensureDeferred
async def test_other_sessions_go_on_during_a_bomb(inv: Invariants, role: str) -> None:
    """While one session sends a bomb, sessions on other ports deliver normally."""
    results: dict[str, str] = {}

    def bomber() -> None:
        client = inv.client(role)
        client.prepare()
        results["bomb"] = client.message(BOMBS["parse-work"][0])

    def honest(other_role: str) -> None:
        client = inv.client(other_role, source="127.0.0.3")
        client.ehlo()
        if other_role != "submissions":
            client.starttls()
            client.ehlo()
        assert client.login() == "235 2.7.0 Authentication successful"
        results[other_role] = client.message()

    def attack() -> None:
        threads = [threading.Thread(target=bomber)] + [
            threading.Thread(target=honest, args=(other,)) for other in ("submission", "submissions", "relay")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)

    await inv.attack(attack)
    assert results["bomb"].startswith("554 5.6.0 ")
    assert all(results[other].startswith("250 ") for other in ("submission", "submissions", "relay"))
    await inv.check(delivered=3, role=role)


