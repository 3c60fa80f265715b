"""A minimal, fast local HTTP API sink for the benchmark (run in its own process).

Raw asyncio HTTP/1.1 server (``asyncio.Protocol``, no framework): keep-alive,
``Content-Length`` bodies only (what mailgate's treq client and aiohttp send
for a JSON POST), pipelining-safe.  Every request other than ``GET /__stats``
is answered ``200 {"id": "<counter>"}``; with ``--token`` a request without
``Authorization: Bearer <token>`` gets a 401 instead (and counts as refused).

``GET /__stats`` answers ``{"requests": N, "refused": M, "bytes": B}``.

    python bench/sink.py --port 8025 [--host 127.0.0.1] [--token T]

It prints ``READY <port>`` on stdout once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

MAX_HEADER = 64 * 1024


class Stats:
    __slots__ = ("requests", "refused", "bytes")

    def __init__(self) -> None:
        self.requests = 0
        self.refused = 0
        self.bytes = 0


class SinkProtocol(asyncio.Protocol):
    def __init__(self, stats: Stats, auth: bytes | None):
        self.stats = stats
        self.auth = auth  # the expected "authorization" header value (lower-cased name)
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data if self.buffer else data
        out = []
        pos = 0
        while True:
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                if len(buf) - pos > MAX_HEADER:
                    self.transport.close()
                    return
                break
            head = buf[pos:end]
            length = 0
            authorized = self.auth is None
            close = False
            lines = head.split(b"\r\n")
            request_line = lines[0]
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"authorization":
                    if self.auth is not None and value.strip() == self.auth:
                        authorized = True
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
                elif name == b"transfer-encoding":
                    self.transport.close()  # not needed by the bench
                    return
            body_start = end + 4
            if len(buf) < body_start + length:
                break  # wait for the rest of the body
            pos = body_start + length
            stats = self.stats
            if request_line.startswith(b"GET /__stats"):
                payload = json.dumps(
                    {"requests": stats.requests, "refused": stats.refused, "bytes": stats.bytes}
                ).encode()
                status = b"200 OK"
            elif not authorized:
                stats.refused += 1
                payload = b'{"error": "unauthorized"}'
                status = b"401 Unauthorized"
            else:
                stats.requests += 1
                stats.bytes += length
                payload = b'{"id": "%d"}' % stats.requests
                status = b"200 OK"
            out.append(
                b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
                % (status, len(payload), b"Connection: close\r\n" if close else b"", payload)
            )
            if close:
                break
        self.buffer = buf[pos:] if pos < len(buf) else b""
        if out:
            self.transport.write(b"".join(out))
            if close:
                self.transport.close()


async def serve(host: str, port: int, token: str | None) -> None:
    stats = Stats()
    auth = f"Bearer {token}".encode() if token else None
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SinkProtocol(stats, auth), host, port, backlog=1024)
    actual = server.sockets[0].getsockname()[1]
    print(f"READY {actual}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    print(json.dumps({"requests": stats.requests, "refused": stats.refused}), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default=None, help="require Authorization: Bearer TOKEN")
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.token))


if __name__ == "__main__":
    main()
