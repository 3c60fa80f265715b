"""Baseline for the benchmark: an idiomatic aiosmtpd + aiohttp SMTP -> HTTP relay.

It does the job mailgate does in ``sync`` delivery mode, the way one would
write it with the usual asyncio libraries:

* aiosmtpd ``SMTP`` server, STARTTLS required (``require_starttls=True``),
  AUTH PLAIN / LOGIN only after TLS (``auth_require_tls=True``,
  ``auth_required=True``), 10 MiB size limit;
* logins are checked against the *same accounts file* mailgate reads
  (``[accounts.NAME] password = "scrypt$..."`` or ``"sha256$..."``):
  scrypt with the parameters stored in the entry, in the default thread
  pool executor, at most 4 at a time (mailgate: reactor thread pool, a
  ``DeferredSemaphore(4)``); sha256 API keys on the event loop (as mailgate);
  unknown users are checked against a decoy of the same cost (as mailgate);
* ``handle_DATA`` parses the message with the stdlib ``email`` package
  (``policy.default``), builds a JSON document shaped like mailgate's
  ``mailgate.email.v1`` (envelope, from, reply_to, to, cc, bcc, subject,
  text, html, attachments as base64, headers, message_id, date), POSTs it
  with ONE shared ``aiohttp.ClientSession`` (keep-alive pool, limit 32 per
  host like mailgate's pool), and answers ``250 2.0.0 Ok: <id>`` on a 2xx
  with ``{"id": ...}``, ``451`` otherwise (timeout 30 s);
* one INFO log line per login and per message, to a file (mailgate logs the
  same two events); aiosmtpd's own per-command INFO logging is left at
  WARNING.

Default asyncio event loop (no uvloop: mailgate runs on Twisted's epoll
reactor in pure Python).

    python bench/baseline_aiosmtpd.py --port 2588 --cert C --key K \
        --accounts accounts.toml --url http://127.0.0.1:8025/v1/emails --token T
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import secrets
import signal
import ssl
import sys
import tomllib
import uuid
from email import policy
from email.headerregistry import AddressHeader
from email.message import EmailMessage
from email.parser import BytesParser

import aiohttp
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword

log = logging.getLogger("baseline")

_SCRYPT = re.compile(
    r"scrypt\$ln=([0-9]{1,2}),r=([0-9]{1,3}),p=([0-9]{1,3})\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)"
)
_SHA256 = re.compile(r"sha256\$([0-9a-fA-F]{64})")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


class PasswordChecker:
    """Verifies PLAIN/LOGIN secrets against mailgate-format hashes."""

    def __init__(self, path: str, max_concurrent: int = 4):
        with open(path, "rb") as f:
            accounts = tomllib.load(f).get("accounts", {})
        self.hashes = {name: entry["password"] for name, entry in accounts.items()}
        like = next((h for h in self.hashes.values() if _SCRYPT.fullmatch(h)), None)
        if like:
            m = _SCRYPT.fullmatch(like)
            self.decoy = (
                f"scrypt$ln={m.group(1)},r={m.group(2)},p={m.group(3)}$"
                f"{base64.b64encode(secrets.token_bytes(16)).decode().rstrip('=')}$"
                f"{base64.b64encode(secrets.token_bytes(32)).decode().rstrip('=')}"
            )
        else:
            self.decoy = "sha256$" + secrets.token_hex(32)
        self.semaphore = asyncio.Semaphore(max_concurrent)

    @staticmethod
    def _scrypt_ok(m: re.Match, secret: bytes) -> bool:
        ln, r, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
        try:
            salt, expected = _unb64(m.group(4)), _unb64(m.group(5))
        except binascii.Error:
            return False
        n = 1 << ln
        derived = hashlib.scrypt(
            secret, salt=salt, n=n, r=r, p=p, maxmem=128 * r * (n + 2 + p) + (1 << 20), dklen=len(expected)
        )
        return hmac.compare_digest(derived, expected)

    async def check(self, username: str, password: bytes) -> bool:
        stored = self.hashes.get(username)
        known = stored is not None
        stored = stored if known else self.decoy
        m = _SHA256.fullmatch(stored)
        if m:
            ok = hmac.compare_digest(hashlib.sha256(password).digest(), bytes.fromhex(m.group(1)))
        else:
            m = _SCRYPT.fullmatch(stored)
            if m is None:
                return False
            async with self.semaphore:
                ok = await asyncio.get_running_loop().run_in_executor(None, self._scrypt_ok, m, password)
        return ok and known


_STRUCTURAL = frozenset(
    {"from", "to", "cc", "bcc", "resent-bcc", "reply-to", "subject", "message-id", "date",
     "mime-version", "return-path", "received"}
)


def _addresses(msg: EmailMessage, name: str) -> list[dict[str, str]]:
    out = []
    for value in msg.get_all(name, []):
        if isinstance(value, AddressHeader):
            for addr in value.addresses:
                out.append({"name": addr.display_name, "address": addr.addr_spec})
    return out


def email_document(raw: bytes, mail_from: str, rcpt_tos: list[str], account: str, message_id: str) -> dict:
    msg: EmailMessage = BytesParser(policy=policy.default).parsebytes(raw)  # type: ignore[assignment]
    text_part = msg.get_body(preferencelist=("plain",))
    html_part = msg.get_body(preferencelist=("html",))
    attachments = []
    for part in msg.iter_attachments():
        content = part.get_payload(decode=True) or b""
        attachments.append(
            {
                "filename": part.get_filename(),
                "content_type": part.get_content_type(),
                "content_id": part.get("Content-ID"),
                "inline": part.get_content_disposition() == "inline",
                "size": len(content),
                "content_base64": base64.b64encode(content).decode("ascii"),
            }
        )
    from_ = _addresses(msg, "From")
    to, cc = _addresses(msg, "To"), _addresses(msg, "Cc")
    # Envelope recipients not named in To/Cc are the Bcc recipients (as mailgate does).
    named = {a["address"].lower() for a in to + cc}
    bcc = [{"name": "", "address": r} for r in rcpt_tos if r.lower() not in named]
    # Like mailgate, the document's "headers" holds only the fields that have no
    # dedicated key (not From/To/Subject/..., not Content-*, not trace fields).
    headers = [
        {"name": name, "value": str(msg.policy.header_fetch_parse(name, value))}
        for name, value in msg.raw_items()
        if name.lower() not in _STRUCTURAL and not name.lower().startswith("content-")
    ]
    subject = msg["Subject"]
    return {
        "schema": "mailgate.email.v1",
        "id": message_id,
        "idempotency_key": message_id,
        "account": account,
        "envelope": {"mail_from": mail_from, "rcpt_to": list(rcpt_tos)},
        "from": from_[0] if from_ else None,
        "reply_to": _addresses(msg, "Reply-To"),
        "to": to,
        "cc": cc,
        "bcc": bcc,
        "subject": str(subject) if subject is not None else "",
        "text": text_part.get_content() if text_part is not None else None,
        "html": html_part.get_content() if html_part is not None else None,
        "attachments": attachments,
        "headers": headers,
        "message_id": str(msg.get("Message-ID", "")) or None,
        "date": str(msg.get("Date", "")) or None,
    }


class RelayHandler:
    def __init__(self, http: aiohttp.ClientSession, url: str, token: str, checker: PasswordChecker):
        self.http = http
        self.url = url
        self.headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "User-Agent": "baseline/0.1",
        }
        self.checker = checker
        self.timeout = aiohttp.ClientTimeout(total=30)

    # -- AUTH: aiosmtpd's authenticator callback is synchronous, so the
    #    mechanisms are overridden with handler methods to await the check.
    async def _login(self, server: SMTP, login: bytes, password: bytes) -> AuthResult:
        username = login.decode("utf-8", "replace")
        if await self.checker.check(username, password):
            log.info("AUTH success for account %s from %s", username, server.session.peer[0])
            return AuthResult(success=True, auth_data=LoginPassword(login, password))
        log.info("AUTH failure for %r from %s", username, server.session.peer[0])
        return AuthResult(success=False, handled=False)

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        try:
            _, login, password = blob.split(b"\x00")
        except (ValueError, AttributeError):
            await server.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return await self._login(server, login, password)

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await server.challenge_auth(server.AuthLoginUsernameChallenge)
        else:
            try:
                login = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        if login is MISSING:
            return AuthResult(success=False, handled=True)
        password = await server.challenge_auth(server.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._login(server, login, password)

    async def handle_DATA(self, server: SMTP, session, envelope) -> str:
        queue_id = uuid.uuid4().hex[:16]
        auth_data = session.auth_data
        account = auth_data.login.decode("utf-8", "replace") if isinstance(auth_data, LoginPassword) else ""
        try:
            document = email_document(envelope.content, envelope.mail_from, envelope.rcpt_tos, account, queue_id)
        except Exception as e:  # noqa: BLE001
            log.info("message %s unparsable: %s", queue_id, e)
            return "554 5.6.0 Message could not be parsed"
        body = json.dumps(document).encode()
        headers = {**self.headers, "Idempotency-Key": queue_id}
        try:
            async with self.http.post(self.url, data=body, headers=headers, timeout=self.timeout) as resp:
                data = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            log.info("message %s: API error %s", queue_id, e)
            return "451 4.3.0 API unavailable, try again later"
        if 200 <= status < 300:
            try:
                api_id = str(json.loads(data)["id"])
            except (ValueError, KeyError, TypeError):
                api_id = queue_id
            reply = f"250 2.0.0 Ok: {api_id}"
        else:
            reply = f"451 4.3.0 API answered {status}"
        log.info(
            "message %s account=%s recipients=%d size=%d: %s",
            queue_id, account, len(envelope.rcpt_tos), len(envelope.content), reply,
        )
        return reply


async def serve(args: argparse.Namespace) -> None:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(args.cert, args.key)
    tls.minimum_version = ssl.TLSVersion.TLSv1_2
    checker = PasswordChecker(args.accounts)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=32, keepalive_timeout=120)
    async with aiohttp.ClientSession(connector=connector) as http:
        handler = RelayHandler(http, args.url, args.token, checker)
        loop = asyncio.get_running_loop()

        def factory() -> SMTP:
            return SMTP(
                handler,
                hostname=args.hostname,
                tls_context=tls,
                require_starttls=True,
                auth_required=True,
                auth_require_tls=True,
                data_size_limit=10 * 1024 * 1024,
                loop=loop,
            )

        server = await loop.create_server(factory, args.host, args.port, backlog=1024)
        print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="aiosmtpd + aiohttp SMTP->HTTP relay (benchmark baseline)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--hostname", default="localhost")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--accounts", required=True, help="mailgate accounts.toml")
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--log", default=None, help="log file (default: stderr)")
    args = parser.parse_args()
    logging.basicConfig(
        filename=args.log, level=logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
