"""DATA framing (mailgate.framing.DataReader): the only end of data is CRLF.CRLF after CRLF."""

from __future__ import annotations

import errno
import io
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate import replies
from mailgate.framing import MAX_LINE, DataReader, dot_stuff


def read(chunks: list[bytes], max_size: int = 10**6, line_endings: str = "reject"):
    """Feed ``chunks`` until the end of data; return (sink bytes, error, leftover, reader)."""
    sink = io.BytesIO()
    reader = DataReader(sink, max_size, line_endings)
    leftover = None
    fed = b""
    for index, chunk in enumerate(chunks):
        leftover = reader.feed(chunk)
        fed += chunk
        if leftover is not None:
            # Whatever the caller had not yet fed also follows the end of data.
            leftover += b"".join(chunks[index + 1 :])
            break
    return sink.getvalue(), reader.error, leftover, reader


def split_at(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p for p in points if 0 < p < len(data)})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in pairwise(edges)]


def reference_end(stream: bytes) -> int | None:
    """Index just past the end-of-data line: the first CRLF.CRLF, counting DATA's own CRLF."""
    index = (b"\r\n" + stream).find(b"\r\n.\r\n")
    return None if index < 0 else index + 3


# -- table tests ------------------------------------------------------------------------

OK_CASES = [
    # (stream, expected sink, expected leftover)
    (b".\r\n", b"", b""),
    (b"a\r\n.\r\n", b"a\r\n", b""),
    (b"a\r\n.\r\nQUIT\r\n", b"a\r\n", b"QUIT\r\n"),
    (b"..\r\n.\r\n", b".\r\n", b""),  # a stuffed lone dot is content
    (b"...x\r\n.\r\n", b"..x\r\n", b""),
    (b".x\r\n.\r\n", b"x\r\n", b""),  # RFC 5321 §4.5.2 transparency
    (b"a\r\n\r\n.\r\n", b"a\r\n\r\n", b""),
    (b"a\r\n. \r\n.\r\n", b"a\r\n \r\n", b""),  # ". " is not the end
    (b"a\r\n.\r\n.\r\n", b"a\r\n", b".\r\n"),  # the first end wins; the rest is a command
    (b"A" * MAX_LINE + b"\r\n.\r\n", b"A" * MAX_LINE + b"\r\n", b""),
    (b"." + b"A" * MAX_LINE + b"\r\n.\r\n", b"A" * MAX_LINE + b"\r\n", b""),
]


@pytest.mark.parametrize("stream, sink, leftover", OK_CASES)
def test_good_streams(stream, sink, leftover):
    """A well-formed DATA stream is unstuffed into the sink and the bytes after the end are returned."""
    got_sink, error, got_leftover, reader = read([stream])
    assert (got_sink, error, got_leftover) == (sink, None, leftover)
    assert reader.done


ERROR_CASES = [
    (b"a\nb\r\n.\r\n", replies.BARE_LF_DATA),
    (b"a\rb\r\n.\r\n", replies.BARE_LF_DATA),
    (b"a\r\r\n.\r\n", replies.BARE_LF_DATA),
    (b"a\x00b\r\n.\r\n", replies.NUL_IN_DATA),
    (b"A" * (MAX_LINE + 1) + b"\r\n.\r\n", replies.DATA_LINE_TOO_LONG),
    (b".." + b"A" * MAX_LINE + b"\r\n.\r\n", replies.DATA_LINE_TOO_LONG),
    # Smuggling end-of-data variants: content, never an end, and rejected.
    (b"a\n.\nMAIL FROM:<x@y>\r\n.\r\n", replies.BARE_LF_DATA),
    (b"a\n.\r\nMAIL FROM:<x@y>\r\n.\r\n", replies.BARE_LF_DATA),
    (b"a\r\n.\nMAIL FROM:<x@y>\r\n.\r\n", replies.BARE_LF_DATA),
    (b"a\r.\rMAIL FROM:<x@y>\r\n.\r\n", replies.BARE_LF_DATA),
    (b"a\r\n\x00.\r\nMAIL FROM:<x@y>\r\n.\r\n", replies.NUL_IN_DATA),
    (b"a\r\n.\r\r\nMAIL FROM:<x@y>\r\n.\r\n", replies.BARE_LF_DATA),
]


@pytest.mark.parametrize("stream, error", ERROR_CASES)
def test_bad_streams_rejected_after_real_end(stream, error):
    """A malformed stream is read to the real CRLF.CRLF and then refused with the first problem's reply."""
    _, got_error, leftover, reader = read([stream])
    assert got_error == error
    assert leftover == b""
    assert reader.done


def test_first_error_wins():
    """When a message has several problems, the reply names the first one."""
    _, error, _, _ = read([b"a\x00\r\nb\nc\r\n.\r\n"])
    assert error == replies.NUL_IN_DATA


@pytest.mark.parametrize(
    "variant", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n\x00.\r\n", b"\r.\r\n"]
)
@pytest.mark.parametrize("mode", ["reject", "normalize"])
def test_end_of_data_variants_never_end_the_message(variant, mode):
    """A fake end-of-data sequence never ends the message: the reader still wants data afterwards."""
    sink = io.BytesIO()
    reader = DataReader(sink, 10**6, mode)
    assert reader.feed(b"Subject: x\r\n\r\nbody" + variant + b"MAIL FROM:<evil@x>\r\n") is None
    assert not reader.done
    assert reader.feed(b".\r\n") == b""


def test_normalize_mode_repairs_bare_line_endings():
    """In normalize mode bare LF and bare CR become CRLF and the message is accepted."""
    sink, error, leftover, _ = read([b"a\nb\rc\r\n.\r\n"], line_endings="normalize")
    assert error is None
    assert sink == b"a\r\nb\r\nc\r\n"
    assert leftover == b""


def test_normalize_mode_still_rejects_nul():
    """Normalising line endings does not let NUL through."""
    _, error, _, _ = read([b"a\x00\r\n.\r\n"], line_endings="normalize")
    assert error == replies.NUL_IN_DATA


def test_oversized_message_discarded_while_streaming():
    """Beyond the size limit nothing more is written to the sink and the reply is 552 5.3.4."""
    sink = io.BytesIO()
    reader = DataReader(sink, 100)
    for _ in range(1000):
        assert reader.feed(b"x" * 50 + b"\r\n") is None
    assert reader.feed(b".\r\n") == b""
    assert reader.error == replies.MESSAGE_TOO_BIG
    assert len(sink.getvalue()) <= 100


def test_size_counts_unstuffed_lines_with_crlf():
    """The size is that of the message after unstuffing, CRLF included."""
    _, error, _, reader = read([b"..ab\r\ncd\r\n.\r\n"])
    assert error is None
    assert reader.size == len(b".ab\r\ncd\r\n")


def test_message_exactly_at_size_limit_accepted():
    """A message whose size equals the limit is accepted; one more octet is not."""
    assert read([b"abc\r\n.\r\n"], max_size=5)[1] is None
    assert read([b"abcd\r\n.\r\n"], max_size=5)[1] == replies.MESSAGE_TOO_BIG


def test_huge_line_memory_bounded():
    """A line of many megabytes keeps at most a line's worth of bytes in memory."""
    sink = io.BytesIO()
    reader = DataReader(sink, 10**9)
    chunk = b"A" * 65536
    for _ in range(160):  # 10 MiB without a line ending
        assert reader.feed(chunk) is None
        assert len(reader._partial) <= MAX_LINE + 2
    assert reader.feed(b"\r\n.\r\nNOOP\r\n") == b"NOOP\r\n"
    assert reader.error == replies.DATA_LINE_TOO_LONG
    assert sink.getvalue() == b""


def test_long_line_ending_in_dot_is_not_end():
    """An overlong line whose last octet before CRLF is a dot, split there, does not end the data."""
    sink = io.BytesIO()
    reader = DataReader(sink, 10**6)
    assert reader.feed(b"A" * 5000 + b".") is None
    assert reader.feed(b"\r\nMAIL FROM:<evil@x>\r\n") is None
    assert reader.feed(b".\r\n") == b""
    assert reader.error == replies.DATA_LINE_TOO_LONG


def test_stuffed_max_line_split_before_crlf():
    """A dot-stuffed line of exactly 998 octets is accepted even when a packet ends just before its LF."""
    line = b"." + b"A" * MAX_LINE
    sink, error, _, _ = read([line + b"\r", b"\n.\r\n"])
    assert error is None
    assert sink == b"A" * MAX_LINE + b"\r\n"


# -- properties -------------------------------------------------------------------------

TOKENS = st.sampled_from(
    [
        b"a",
        b"b",
        b".",
        b"..",
        b"\r",
        b"\n",
        b"\r\n",
        b"\x00",
        b" ",
        b"\r\n.\r\n",
        b"\r\n.",
        b"\xff",
        b"A" * 500,
        b"A" * 997,
        b"\r\n" + b"." + b"B" * 998,
    ]
)
streams = st.lists(TOKENS, max_size=25).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(
    stream=streams,
    points=st.lists(st.integers(min_value=0, max_value=5000), max_size=20),
    mode=st.sampled_from(["reject", "normalize"]),
)
def test_random_splits_give_identical_results(stream, points, mode):
    """However the stream is cut into packets, the end, the error and (when accepted) the message are the same."""
    stream += b"\r\n.\r\nTAIL"
    whole = read([stream], line_endings=mode)
    parts = read(split_at(stream, points), line_endings=mode)
    assert parts[1] == whole[1]  # error
    assert parts[2] == whole[2]  # leftover
    assert parts[3].size == whole[3].size or whole[1] is not None
    if whole[1] is None:
        assert parts[0] == whole[0]


@settings(max_examples=300, deadline=None)
@given(stream=streams, mode=st.sampled_from(["reject", "normalize"]))
def test_only_crlf_dot_crlf_ends_data(stream, mode):
    """The end of data is exactly the first CRLF.CRLF (DATA's own CRLF counting as the first CRLF)."""
    stream += b"\r\n.\r\nTAIL"
    end = reference_end(stream)
    assert end is not None
    _, _, leftover, reader = read([stream], line_endings=mode)
    assert reader.done
    assert leftover == stream[end:]


@settings(max_examples=200, deadline=None)
@given(stream=streams)
def test_byte_by_byte_equals_one_packet(stream):
    """Feeding one octet at a time gives exactly the one-packet result."""
    stream += b"\r\n.\r\n"
    whole = read([stream])
    single = read([stream[i : i + 1] for i in range(len(stream))])
    assert single[1:3] == whole[1:3]
    if whole[1] is None:
        assert single[0] == whole[0]


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(
        st.binary(max_size=80).filter(
            lambda b: b"\r" not in b and b"\n" not in b and b"\x00" not in b
        ),
        max_size=15,
    )
)
def test_stuffing_round_trip(lines):
    """A message of CRLF lines, dot-stuffed by the client, comes out of the reader unchanged."""
    message = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    sink, error, leftover, _ = read([stuffed + b".\r\n"])
    assert (sink, error, leftover) == (message, None, b"")


class _FullDisk(io.RawIOBase):
    """A sink on a full disk: every write fails with ENOSPC."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data):  # type: ignore[override]
        self.writes += 1
        raise OSError(errno.ENOSPC, "No space left on device")


def test_sink_write_error_is_recorded_and_reading_continues():
    """An OSError from the sink becomes 452 4.3.1; writing stops, but the reader still
    finds the real end of data (content lines are never mistaken for commands)."""
    sink = _FullDisk()
    reader = DataReader(sink, 10**6)
    assert reader.feed(b"Subject: x\r\n\r\nline\r\n") is None
    assert reader.error == replies.SPOOL_WRITE_FAILED
    assert reader.error.code == 452 and reader.error.enhanced == "4.3.1"
    assert reader.feed(b"QUIT\r\nmore\r\n") is None
    assert reader.feed(b".\r\nNOOP\r\n") == b"NOOP\r\n"
    assert reader.done
    assert sink.writes == 1


# -- dot_stuff: the sending half -----------------------------------------------------


@pytest.mark.parametrize(
    ("message", "stuffed"),
    [
        (b"a\r\n.b\r\n", b"a\r\n..b\r\n.\r\n"),
        (b".first\r\nx\r\n", b"..first\r\nx\r\n.\r\n"),
        (b"a\r\n.\r\nMAIL FROM:<x@y>\r\n", b"a\r\n..\r\nMAIL FROM:<x@y>\r\n.\r\n"),
        (b"no final break", b"no final break\r\n.\r\n"),
        (b"bare\nlf\rcr\n.\n", b"bare\r\nlf\r\ncr\r\n..\r\n.\r\n"),
        (b"", b".\r\n"),
    ],
)
def test_dot_stuff_examples(message: bytes, stuffed: bytes) -> None:
    """Leading dots are doubled on every line (the first too), line breaks become CRLF,
    and the end-of-data line follows; a lone dot line can never end the data early."""
    assert dot_stuff(message) == stuffed


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")), max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
)
def test_dot_stuff_round_trips_through_the_reader(lines: list[bytes], cuts: list[int]) -> None:
    """What dot_stuff sends, mailgate's own DATA reader reads back exactly, in any chunking,
    ending exactly at the end of the stuffed bytes."""
    message = b"".join(line + b"\r\n" for line in lines)
    stuffed = dot_stuff(message)
    data, error, leftover, _ = read(split_at(stuffed + b"QUIT\r\n", cuts))
    assert (data, error, leftover) == (message, None, b"QUIT\r\n")
