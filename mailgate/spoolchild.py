"""The spool writer process: does the queue's fsyncs on a core of its own.

Why a process: the server parses a message (pure Python, holding the GIL) while
its spool file is written.  A thread doing the write would wait for the GIL
between its system calls, so the two would take turns; a process writes and
fsyncs in parallel with the parse, and leaves the reactor thread nothing but
a few pipe writes per message.  Postfix splits its queue writer from smtpd for
the same reason.

The protocol on stdin/stdout, one frame per request::

    request: op (1 byte) | name length (1 byte) | data length (4 bytes, big-endian) | name | data
    reply:   op (1 byte) | name length (1 byte) | errno (4 bytes, big-endian, 0 = done) | name

``P`` prepares ``tmp/<name>`` with ``data``; ``C`` publishes it (rename, then
one directory fsync for every ``C`` read in the same batch); ``D`` discards
it; ``R`` removes ``messages/<name>`` once the message is delivered.  Every
request gets one reply, in the order the work finishes.  End of input (the
server closed the pipe, or died) ends the process once the requests already
read are done; stop signals other than SIGKILL are ignored.  Only the standard
library and :mod:`mailgate.spoolfiles` are imported, so the process starts in
milliseconds.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import sys
from collections.abc import Callable

from mailgate import spoolfiles

PREPARE, PUBLISH, DISCARD, REMOVE = b"P", b"C", b"D", b"R"
OPS = (PREPARE, PUBLISH, DISCARD, REMOVE)
_REQUEST = struct.Struct(">cBI")
_REPLY = struct.Struct(">cBi")
MAX_NAME = 64  # queue ids are 26 characters; anything else is a protocol error


def encode_request(op: bytes, name: str, data: bytes = b"") -> bytes:
    encoded = name.encode("ascii", "surrogateescape")
    return _REQUEST.pack(op, len(encoded), len(data)) + encoded + data


def decode_requests(buffer: bytearray) -> list[tuple[bytes, str, bytes]]:
    """Take every complete request off the front of ``buffer``."""
    requests, offset = [], 0
    while len(buffer) - offset >= _REQUEST.size:
        op, name_length, data_length = _REQUEST.unpack_from(buffer, offset)
        end = offset + _REQUEST.size + name_length + data_length
        if len(buffer) < end:
            break
        start = offset + _REQUEST.size
        name = bytes(buffer[start : start + name_length]).decode("ascii", "surrogateescape")
        requests.append((op, name, bytes(buffer[start + name_length : end])))
        offset = end
    del buffer[:offset]
    return requests


def encode_reply(op: bytes, name: str, error: int) -> bytes:
    encoded = name.encode("ascii", "surrogateescape")
    return _REPLY.pack(op, len(encoded), error) + encoded


def decode_replies(buffer: bytearray) -> list[tuple[bytes, str, int]]:
    """Take every complete reply off the front of ``buffer``."""
    replies, offset = [], 0
    while len(buffer) - offset >= _REPLY.size:
        op, name_length, error = _REPLY.unpack_from(buffer, offset)
        end = offset + _REPLY.size + name_length
        if len(buffer) < end:
            break
        replies.append((op, bytes(buffer[offset + _REPLY.size : end]).decode("ascii", "surrogateescape"), error))
        offset = end
    del buffer[:offset]
    return replies


def _valid(op: bytes, name: str) -> bool:
    return op in OPS and 0 < len(name) <= MAX_NAME and name.isascii() and name.isalnum()


def _errno(error: OSError) -> int:
    return error.errno or errno.EIO


def handle(tmp: str, messages: str, requests: list[tuple[bytes, str, bytes]], reply: Callable[[bytes], None]) -> None:
    """Carry out one batch of requests, calling ``reply(bytes)`` as each is done."""
    publish: list[str] = []
    for op, name, data in requests:
        if not _valid(op, name):
            reply(encode_reply(op, name, errno.EINVAL))  # echoed, so that the request is answered
        elif op == PREPARE:
            try:
                spoolfiles.prepare_file(tmp, name, data)
                reply(encode_reply(op, name, 0))
            except OSError as e:
                reply(encode_reply(op, name, _errno(e)))
        elif op == DISCARD:
            spoolfiles.discard_file(tmp, name)
            reply(encode_reply(op, name, 0))
        elif op == REMOVE:
            try:
                spoolfiles.remove_message(messages, name)
                reply(encode_reply(op, name, 0))
            except OSError as e:
                reply(encode_reply(op, name, _errno(e)))
        else:
            publish.append(name)
    if publish:
        results = spoolfiles.publish_batch(tmp, messages, publish)
        reply(b"".join(encode_reply(PUBLISH, name, 0 if e is None else _errno(e)) for name, e in zip(publish, results)))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main(argv: list[str]) -> int:
    """``spoolchild TMP MESSAGES``: serve requests on stdin until it closes."""
    tmp, messages = argv
    # A stop signal to the whole process group or cgroup (Ctrl-C; systemd's
    # KillMode=control-group) must not cut the server's last messages short:
    # the server closes the pipe once it is done, and that ends this process.
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, signal.SIG_IGN)
    buffer = bytearray()
    try:
        while True:
            chunk = os.read(0, 1 << 20)
            if not chunk:
                return 0
            buffer += chunk
            handle(tmp, messages, decode_requests(buffer), lambda data: _write_all(1, data))
    except BrokenPipeError:
        return 0  # The server is gone: nobody is waiting for the answers.


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
