"""mailgate.message structural limits: checked before or while the stdlib parser works."""

from __future__ import annotations

import tracemalloc

import pytest

from mailgate import message
from mailgate.message import (
    MAX_ENCODED_WORDS,
    MAX_FIELD_SIZE,
    MAX_LINES,
    MessageParseError,
    MessageTooLarge,
    MimeLimits,
    parse_message,
)

HEAD = b"From: a@example.com\r\nTo: b@example.org\r\n"


@pytest.fixture
def parser_must_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: object, data: bytes) -> None:
        raise AssertionError("the stdlib parser ran")

    monkeypatch.setattr(message._LimitedFeedParser, "feed", refuse)


@pytest.mark.parametrize(
    "raw, reason",
    [
        (HEAD + b"X-Big: a\r\n" + b" " + b"b" * 900 + b"\r\n" * 1 + (b" " + b"b" * 900 + b"\r\n") * 80 + b"\r\nx\r\n", "header field larger than"),
        (HEAD + b"".join(b"X-%d: " % i + b"v" * 900 + b"\r\n" for i in range(300)) + b"\r\nx\r\n", "header block larger than"),
        (HEAD + b"\r\n" * (MAX_LINES + 1), f"more than {MAX_LINES} lines"),
    ],
    ids=["field", "block", "lines"],
)
def test_size_refusals_come_before_parsing(parser_must_not_run: None, raw: bytes, reason: str) -> None:
    """An oversized top-level field or header block, or too many lines, is refused from
    the raw bytes (MessageTooLarge, hence 552 5.3.4) before the parser builds anything."""
    with pytest.raises(MessageTooLarge, match=reason):
        parse_message(raw, "", ["b@example.org"])


def test_header_count_refused_before_parsing(parser_must_not_run: None) -> None:
    """Too many top-level fields is a structure refusal (554), also from the raw bytes."""
    raw = HEAD + b"".join(b"X-%d: v\r\n" % i for i in range(20)) + b"\r\nx\r\n"
    with pytest.raises(MessageParseError, match="more than 10 header fields") as info:
        parse_message(raw, "", [], limits=MimeLimits(max_header_count=10))
    assert not isinstance(info.value, MessageTooLarge)


def test_part_header_limits_apply_while_parsing() -> None:
    """A part's own header block is measured as the parser reaches it."""
    part_headers = b"".join(b"X-P%d: v\r\n" % i for i in range(20))
    raw = HEAD + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n" + part_headers + b"\r\nx\r\n--b--\r\n"
    with pytest.raises(MessageParseError, match="more than 10 header fields"):
        parse_message(raw, "", [], limits=MimeLimits(max_header_count=10))
    assert parse_message(raw, "", [], limits=MimeLimits(max_header_count=20)).text == "x"


def test_depth_and_parts_stop_the_parser_early() -> None:
    """Nesting 2,000 deep is refused at the configured depth, not by exhausting recursion."""
    raw = HEAD + b"Content-Type: message/rfc822\r\n\r\n" * 2000 + b"x\r\n"
    with pytest.raises(MessageParseError, match="nested deeper than 3 levels") as info:
        parse_message(raw, "", [], limits=MimeLimits(max_depth=3))
    assert info.value.__cause__ is None


@pytest.mark.parametrize(
    "value, accepted",
    [
        (", ".join(f'"Doe, J{i}" <j{i}@example.org>' for i in range(10)), True),
        (", ".join(f"j{i}@example.org" for i in range(11)), False),
        ("g1: a@x.example; g2: b@x.example, c@x.example;" * 4, False),
        ('"unclosed, a, b, c, d, e, f, g, h, i, j <x@example.org>', False),
    ],
    ids=["quoted-commas", "eleven", "groups", "unclosed-quote"],
)
def test_address_count_bound(value: str, accepted: bool) -> None:
    """Separators outside quoted strings bound the addresses; an unclosed quote hides none."""
    raw = b"From: a@example.com\r\nTo: " + value.encode() + b"\r\n\r\nx\r\n"
    limits = MimeLimits(max_addresses_per_header=10)
    if accepted:
        assert len(parse_message(raw, "", [], limits=limits).to) == 10
    else:
        with pytest.raises(MessageParseError, match="To header has more than 10 addresses"):
            parse_message(raw, "", [], limits=limits)


def test_repeated_fields_count_together() -> None:
    """Two To: fields of 6 addresses are 12 To addresses."""
    field = b"To: " + b", ".join(b"u%d@example.org" % i for i in range(6)) + b"\r\n"
    raw = b"From: a@example.com\r\n" + field * 2 + b"\r\nx\r\n"
    with pytest.raises(MessageParseError, match="more than 10 addresses"):
        parse_message(raw, "", [], limits=MimeLimits(max_addresses_per_header=10))


def _words(count: int) -> bytes:
    return b"\r\n ".join(b"=?utf-8?q?caf=C3=A9?=" for _ in range(count))


def test_dense_encoded_words_are_decoded_in_linear_memory() -> None:
    """A field with thousands of encoded words is decoded by the linear legacy decoder:
    the same text, in a few MiB instead of the stdlib's quadratic 100+ MiB."""
    count = 2500
    assert len(_words(count)) < MAX_FIELD_SIZE
    raw = (
        b"From: " + _words(count) + b" <a@example.com>\r\nTo: b@example.org\r\n"
        b"Subject: " + _words(count) + b"\r\nX-Words: " + _words(count) + b"\r\n\r\nx\r\n"
    )
    tracemalloc.start()
    try:
        email_ = parse_message(raw, "", [])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert email_.subject == "café" * count
    assert email_.from_ is not None and email_.from_.address == "a@example.com"
    assert email_.from_.name == "café" * count
    assert dict(email_.headers)["X-Words"] == "café" * count
    assert peak < 20 * 2**20


def test_few_encoded_words_keep_the_standard_decoder() -> None:
    """Up to MAX_ENCODED_WORDS a field is decoded by policy.default as before."""
    raw = b"From: a@example.com\r\nSubject: " + b" ".join([b"=?utf-8?q?a?="] * MAX_ENCODED_WORDS) + b"\r\n\r\nx\r\n"
    assert parse_message(raw, "", []).subject == "a" * MAX_ENCODED_WORDS


def test_eight_bit_leaf_with_a_strict_codec_charset() -> None:
    """charset=idna on an 8-bit part (a codec that refuses errors="replace") is delivered,
    not refused: found by tests/test_message_fuzz.py."""
    raw = b"From: a@example.com\r\nContent-Type: text/plain; charset=idna\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"
    assert parse_message(raw, "", []).text == "Grüße\n"
