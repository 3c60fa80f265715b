"""SMTP submission load generator (asyncio streams; run in its own process).

Modes:

``persistent``  ``--sessions N --messages M``: N concurrent sessions, each
    connect, EHLO, STARTTLS, EHLO, AUTH PLAIN, M messages, QUIT.
``oneshot``     ``--total K --concurrency N``: K messages, each in a new
    session (new TCP connection, full TLS handshake, AUTH), N at a time.
``http``        ``--total K --url URL``: K sequential POSTs of a
    mailgate-sized JSON document straight to the HTTP sink on one keep-alive
    connection (the reference for "latency added by the gateway").

Each message is a ~4 KB multipart/alternative (text + HTML) email.  The
latency recorded per message is from writing the final ``.<CRLF>`` (sent in
the same write as the message body) until the reply line has arrived.  No
PIPELINING (the baseline does not offer it): one command, one reply.

Output: a summary line, or with ``--json`` one JSON object with messages/s
(wall clock from the first connect to the last reply, session setup
included), p50/p90/p99/max latency in ms, error count, and the load
generator's own CPU use (``cpu_pct`` of one core) so one can see it is not
the bottleneck.  TLS certificates are not verified (loopback, self-signed).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import resource
import ssl
import sys
import time
from urllib.parse import urlsplit

TEXT_PARAGRAPH = (
    "Hello {n},\r\n\r\n"
    "This is message number {n} of the mailgate benchmark. It carries a plain\r\n"
    "text part and an HTML part, like most transactional mail does. Nothing\r\n"
    "in it is special: no attachments, no unusual encodings, ASCII only.\r\n"
    ".A line that starts with a dot, to exercise dot-stuffing.\r\n"
)
HTML_ROW = (
    '<tr><td style="padding:4px 8px;font-family:Arial,sans-serif">Item {i}</td>'
    '<td style="padding:4px 8px;text-align:right">{price}.00 EUR</td></tr>\r\n'
)


def make_message(sender: str, recipient: str, seq: str) -> bytes:
    """A ~4 KB multipart/alternative message, dot-stuffed, ending with CRLF.CRLF."""
    text = "".join(TEXT_PARAGRAPH.format(n=i) for i in range(4))
    rows = "".join(HTML_ROW.format(i=i, price=10 + i) for i in range(16))
    html = (
        "<!DOCTYPE html>\r\n<html><head><meta charset=\"utf-8\"><title>Receipt</title></head>\r\n"
        "<body style=\"margin:0;padding:16px;background:#f4f4f4\">\r\n"
        "<h1 style=\"font-family:Arial,sans-serif;font-size:20px\">Your receipt</h1>\r\n"
        "<p style=\"font-family:Arial,sans-serif\">Thanks for your order. Here is what you bought:</p>\r\n"
        f"<table cellspacing=\"0\" cellpadding=\"0\" border=\"0\">\r\n{rows}</table>\r\n"
        "<p style=\"font-family:Arial,sans-serif;color:#666\">Questions? Just reply.</p>\r\n"
        "</body></html>\r\n"
    )
    boundary = "=_bench_boundary_0123456789"
    message = (
        f"From: Bench Sender <{sender}>\r\n"
        f"To: Bench Recipient <{recipient}>\r\n"
        f"Subject: Benchmark message {seq}\r\n"
        f"Message-ID: <{seq}@loadgen.bench>\r\n"
        "Date: Sat, 22 Nov 2025 10:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        f"Content-Type: multipart/alternative; boundary=\"{boundary}\"\r\n"
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 7bit\r\n\r\n"
        f"{text}\r\n"
        f"--{boundary}\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 7bit\r\n\r\n"
        f"{html}\r\n"
        f"--{boundary}--\r\n"
    )
    stuffed = "\r\n".join(("." + line if line.startswith(".") else line) for line in message.split("\r\n"))
    return stuffed.encode("ascii") + b".\r\n"


class SMTPError(Exception):
    pass


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    while True:
        line = await reader.readline()
        if not line:
            raise SMTPError("connection closed by server")
        if line[3:4] != b"-":
            return int(line[:3]), line


async def command(reader, writer, line: bytes, expect: int) -> bytes:
    writer.write(line)
    code, text = await read_reply(reader)
    if code != expect:
        raise SMTPError(f"{line[:20]!r} -> {text!r}")
    return text


class Results:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.error_samples: list[str] = []
        self.ok = 0
        self.tls: str | None = None

    def error(self, what: str, count: int = 1) -> None:
        self.errors += count
        if len(self.error_samples) < 5:
            self.error_samples.append(what)


async def smtp_session(args, ctx: ssl.SSLContext, auth: bytes, messages: int, res: Results, sid: int) -> None:
    sent = 0
    writer = None
    try:
        reader, writer = await asyncio.open_connection(args.host, args.port)
        code, text = await read_reply(reader)
        if code != 220:
            raise SMTPError(f"banner {text!r}")
        await command(reader, writer, b"EHLO loadgen.bench\r\n", 250)
        await command(reader, writer, b"STARTTLS\r\n", 220)
        await writer.start_tls(ctx, server_hostname="localhost")
        if res.tls is None:
            tls = writer.get_extra_info("ssl_object")
            res.tls = f"{tls.version()} {tls.cipher()[0]}" if tls else "?"
        await command(reader, writer, b"EHLO loadgen.bench\r\n", 250)
        await command(reader, writer, b"AUTH PLAIN " + auth + b"\r\n", 235)
        perf = time.perf_counter
        for i in range(messages):
            await command(reader, writer, b"MAIL FROM:<sender@bench.example>\r\n", 250)
            await command(reader, writer, b"RCPT TO:<rcpt@bench.example>\r\n", 250)
            await command(reader, writer, b"DATA\r\n", 354)
            body = make_message("sender@bench.example", "rcpt@bench.example", f"{sid}.{i}")
            t0 = perf()
            writer.write(body)
            code, text = await read_reply(reader)
            elapsed = perf() - t0
            sent += 1
            if code == 250:
                res.ok += 1
                res.latencies.append(elapsed)
            else:
                res.error(text.decode("ascii", "replace").strip())
        await command(reader, writer, b"QUIT\r\n", 221)
    except (OSError, SMTPError, ssl.SSLError, asyncio.IncompleteReadError) as e:
        res.error(f"session {sid}: {type(e).__name__}: {e}", messages - sent)
    finally:
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass


async def run_persistent(args, ctx, auth, res: Results) -> None:
    await asyncio.gather(*(smtp_session(args, ctx, auth, args.messages, res, s) for s in range(args.sessions)))


async def run_oneshot(args, ctx, auth, res: Results) -> None:
    counter = iter(range(args.total))

    async def worker() -> None:
        for n in counter:
            await smtp_session(args, ctx, auth, 1, res, n)

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))


def http_document(n: int) -> bytes:
    """A JSON document of the size and shape mailgate POSTs for the bench message."""
    raw = make_message("sender@bench.example", "rcpt@bench.example", str(n)).decode()
    text, _, html = raw.partition("text/html")
    return json.dumps(
        {
            "schema": "mailgate.email.v1",
            "id": f"q{n}",
            "envelope": {"mail_from": "sender@bench.example", "rcpt_to": ["rcpt@bench.example"]},
            "from": {"name": "Bench Sender", "address": "sender@bench.example"},
            "to": [{"name": "Bench Recipient", "address": "rcpt@bench.example"}],
            "subject": f"Benchmark message {n}",
            "text": text,
            "html": html,
            "attachments": [],
            "headers": [{"name": "X-Pad", "value": "x" * 400}],
        }
    ).encode()


async def run_http(args, res: Results) -> None:
    url = urlsplit(args.url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port or 80)
    perf = time.perf_counter
    try:
        for n in range(args.total):
            body = http_document(n)
            request = (
                f"POST {url.path or '/'} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                f"Authorization: Bearer {args.token}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode() + body
            t0 = perf()
            writer.write(request)
            status = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            elapsed = perf() - t0
            if status[9:10] == b"2":
                res.ok += 1
                res.latencies.append(elapsed)
            else:
                res.error(status.decode("latin-1").strip())
    finally:
        writer.close()


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("persistent", "oneshot", "http"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=587)
    parser.add_argument("--user", default="bench")
    parser.add_argument("--password", default="benchpass")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--total", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--url", default=None, help="http mode: the sink URL")
    parser.add_argument("--token", default="bench-token-not-secret")
    parser.add_argument("--label", default="")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    auth = base64.b64encode(b"\0" + args.user.encode() + b"\0" + args.password.encode())
    res = Results()

    cpu0, t0 = cpu_seconds(), time.perf_counter()
    if args.mode == "persistent":
        asyncio.run(run_persistent(args, ctx, auth, res))
    elif args.mode == "oneshot":
        asyncio.run(run_oneshot(args, ctx, auth, res))
    else:
        asyncio.run(run_http(args, res))
    wall = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0

    lat = sorted(res.latencies)
    ms = 1000.0
    out = {
        "label": args.label,
        "mode": args.mode,
        "ok": res.ok,
        "errors": res.errors,
        "error_samples": res.error_samples,
        "wall_s": round(wall, 4),
        "msgs_per_s": round(res.ok / wall, 2) if wall > 0 else 0.0,
        "p50_ms": round(percentile(lat, 0.50) * ms, 3),
        "p90_ms": round(percentile(lat, 0.90) * ms, 3),
        "p99_ms": round(percentile(lat, 0.99) * ms, 3),
        "max_ms": round(lat[-1] * ms, 3) if lat else float("nan"),
        "loadgen_cpu_pct": round(100.0 * cpu / wall, 1) if wall > 0 else 0.0,
        "tls": res.tls,
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{args.label or args.mode}: {out['msgs_per_s']:.1f} msg/s, p50 {out['p50_ms']:.2f} ms, "
            f"p99 {out['p99_ms']:.2f} ms, errors {out['errors']}, loadgen CPU {out['loadgen_cpu_pct']}%"
        )
        for sample in res.error_samples:
            print("  error:", sample, file=sys.stderr)


if __name__ == "__main__":
    main()
