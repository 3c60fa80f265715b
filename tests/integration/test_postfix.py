"""Postfix as a smart-host client of mailgate, with Debian's postfix package.

Each test starts a private Postfix instance (its own config, queue and data
directories under a temporary directory, no listening port) from the samples in
etc/postfix/, changed only where a user would change them (relayhost, CA file,
password map location), submits a message with Postfix's sendmail, and watches
it travel over TLS and SASL to mailgate and on to the fake API.  A transient API
failure must leave the message deferred in Postfix's queue, not bounced, until
it goes through.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from mailgate import auth
from mailgate.testing import ScriptedResponse
from tests.integration.conftest import PASSWORDS, Gateway

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "etc" / "postfix"
WAIT = 90.0  # Generous: the machine may be loaded.

# Only what the test needs: no smtpd listener, no local delivery, nothing chrooted.
MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix_tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        pytest.fail(f"{name} is required (apt-get install postfix libsasl2-modules)")
    return path


@dataclass
class Postfix:
    """One private Postfix instance; every command runs against its config directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "etc"

    def run(self, tool: str, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        flag = "-C" if tool == "sendmail" else "-c"
        return subprocess.run(
            [postfix_tool(tool), flag, str(self.config), *args],
            input=stdin,
            capture_output=True,
            timeout=120,
            check=False,
        )

    def must(self, tool: str, *args: str, stdin: bytes | None = None) -> None:
        completed = self.run(tool, *args, stdin=stdin)
        assert completed.returncode == 0, (tool, args, completed.stdout, completed.stderr, self.log())

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def queue(self) -> list[dict[str, Any]]:
        completed = self.run("postqueue", "-j")
        assert completed.returncode == 0, (completed.stderr, self.log())
        return [json.loads(line) for line in completed.stdout.decode().splitlines() if line.strip()]

    def submit(self, sender: str, recipient: str, message: bytes) -> None:
        self.must("sendmail", "-f", sender, "--", recipient, stdin=message)

    def wait_for(self, what: str, condition: Callable[[], bool]) -> None:
        """Poll Postfix's queue or log until ``condition`` holds (Postfix has no event to await)."""
        deadline = time.monotonic() + WAIT
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"Postfix never reached: {what}\nqueue: {self.queue()}\nlog:\n{self.log()}")
            time.sleep(0.2)


def start_postfix(root: Path, sample: str, overrides: dict[str, str], sasl_key: str, login: str) -> Postfix:
    """Configure ``root`` from the sample and start Postfix on it."""
    postfix = Postfix(root)
    for name in ("etc", "queue", "data"):
        (root / name).mkdir()
    postfix_user = pwd.getpwnam("postfix")
    os.chown(root / "data", postfix_user.pw_uid, postfix_user.pw_gid)
    shutil.copy(SAMPLES / sample, postfix.config / "main.cf")
    (postfix.config / "master.cf").write_text(MASTER_CF)
    sasl_sample = (SAMPLES / "sasl_passwd").read_text()
    relay_line = next(line for line in sasl_sample.splitlines() if sample_relayhost(sample) in line)
    sasl_passwd = postfix.config / "sasl_passwd"
    sasl_passwd.write_text(
        relay_line.replace(sample_relayhost(sample), sasl_key).replace(
            "postfix-relay:REPLACE-WITH-THE-ACCOUNT-PASSWORD", login
        )
        + "\n"
    )
    sasl_passwd.chmod(0o600)
    settings = {
        # Where this instance lives (a system Postfix has these in /var/spool/postfix...).
        "compatibility_level": "3.6",
        "queue_directory": str(root / "queue"),
        "data_directory": str(root / "data"),
        "mail_owner": "postfix",
        "setgid_group": grp.getgrgid(os.stat(postfix_tool("postdrop")).st_gid).gr_name,
        "maillog_file": str(root / "maillog"),
        "maillog_file_prefixes": str(root),
        "myhostname": "client.example",
        "mydestination": "",
        "local_transport": "error:local delivery is disabled",
        "alias_maps": "",
        "alias_database": "",
        "inet_interfaces": "loopback-only",
        "inet_protocols": "ipv4",
        # [localhost] from /etc/hosts, not DNS (there is none in CI).
        "smtp_host_lookup": "native",
        **overrides,
    }
    postfix.must("postconf", "-e", *(f"{key}={value}" for key, value in settings.items()))
    postfix.must("postmap", f"hash:{sasl_passwd}")
    postfix.must("postfix", "start")
    return postfix


def sample_relayhost(sample: str) -> str:
    for line in (SAMPLES / sample).read_text().splitlines():
        if line.startswith("relayhost = "):
            return line.split(" = ", 1)[1]
    raise AssertionError(f"{sample} sets no relayhost")


def stop_postfix(postfix: Postfix) -> None:
    """``postfix stop`` waits for the master to go (and kills it after 5 s)."""
    if postfix.run("postfix", "status").returncode == 0:
        completed = postfix.run("postfix", "stop")
        assert completed.returncode == 0, (completed.stderr, postfix.log())


@pytest.fixture
def postfix_factory(gateway: Gateway) -> Iterator[Callable[..., Postfix]]:
    """Start Postfix instances relaying to ``gateway``; stop them even when a test fails."""
    started: list[Postfix] = []
    roots: list[str] = []

    def start(sample: str, mechanism: str) -> Postfix:
        # A short path: Postfix's sockets live under queue_directory (AF_UNIX paths are
        # short), and the postfix user must be able to traverse it.
        root = tempfile.mkdtemp(prefix="pf", dir="/tmp")
        roots.append(root)
        os.chmod(root, 0o755)
        role = "submissions" if sample.endswith(".465") else "submission"
        relayhost = f"[localhost]:{gateway.ports[role]}"
        ca = Path(root) / "mailgate-ca.pem"
        shutil.copy(gateway.ca_path, ca)
        ca.chmod(0o644)
        postfix = start_postfix(
            Path(root),
            sample,
            {
                "relayhost": relayhost,
                "smtp_tls_CAfile": str(ca),
                "smtp_sasl_password_maps": f"hash:{root}/etc/sasl_passwd",
                "smtp_sasl_mechanism_filter": mechanism,
            },
            sasl_key=relayhost,
            login=f"alice:{PASSWORDS['alice']}",
        )
        started.append(postfix)
        return postfix

    try:
        yield start
    finally:
        for postfix in started:
            stop_postfix(postfix)
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mechanisms(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SASL mechanism names clients ask mailgate for."""
    seen: list[str] = []
    original = auth.new_mechanism

    def spy(name: str, *args: Any) -> Any:
        seen.append(name)
        return original(name, *args)

    monkeypatch.setattr(auth, "new_mechanism", spy)
    return seen


def message(subject: str) -> bytes:
    return (
        "From: App <app@example.com>\n"
        "To: Customer <customer@example.org>\n"
        f"Subject: {subject}\n"
        "\n"
        "Hello through Postfix.\n"
    ).encode()


async def relay_one(postfix: Postfix, gateway: Gateway, subject: str) -> Any:
    received = gateway.api.next_request()
    received.addTimeout(WAIT, reactor)
    await threads.deferToThread(postfix.submit, "app@example.com", "customer@example.org", message(subject))
    return await received


def assert_relayed(request: Any, subject: str) -> None:
    body = request.json()
    assert body["account"] == "alice"
    assert body["envelope"] == {"mail_from": "app@example.com", "rcpt_to": ["customer@example.org"]}
    assert body["subject"] == subject
    assert body["text"] == "Hello through Postfix.\n"


@pytest.mark.parametrize(
    ("sample", "mechanism"),
    [("main.cf", "plain"), ("main.cf.465", "cram-md5")],
    ids=["587-starttls-plain", "465-wrappermode-cram-md5"],
)
@pytest_twisted.ensureDeferred
async def test_postfix_relays_through_mailgate(
    gateway: Gateway, postfix_factory: Callable[..., Postfix], mechanisms: list[str], sample: str, mechanism: str
) -> None:
    """A message submitted to Postfix reaches the API through mailgate: verified TLS
    (STARTTLS on 587, wrapper mode on 465), SASL with the pinned mechanism, and Postfix
    records mailgate's 250 with the API's id."""
    postfix = await threads.deferToThread(postfix_factory, sample, mechanism)
    subject = f"relayed by Postfix ({sample}, {mechanism})"
    request = await relay_one(postfix, gateway, subject)
    assert_relayed(request, subject)
    await threads.deferToThread(postfix.wait_for, "queue empty", lambda: postfix.queue() == [])
    log = postfix.log()
    port = gateway.ports["submissions" if sample.endswith(".465") else "submission"]
    assert f"Verified TLS connection established to localhost[127.0.0.1]:{port}" in log
    assert "status=sent (250 2.0.0 Ok: fake-1)" in log
    assert mechanisms == [mechanism.upper()]


@pytest_twisted.ensureDeferred
async def test_api_outage_defers_in_postfix_until_it_recovers(
    gateway: Gateway, postfix_factory: Callable[..., Postfix]
) -> None:
    """An API 503 makes mailgate answer 451: Postfix keeps the message deferred with that
    reason (nothing bounced), and delivers it once the API is back and the queue flushed."""
    gateway.api.respond(ScriptedResponse(status=503, body={"message": "maintenance"}))
    postfix = await threads.deferToThread(postfix_factory, "main.cf", "plain")
    failed = await relay_one(postfix, gateway, "held back")
    assert_relayed(failed, "held back")

    def deferred_by_mailgate() -> bool:
        queue = postfix.queue()
        return (
            len(queue) == 1
            and queue[0]["queue_name"] == "deferred"
            and "451 4.3.0" in queue[0]["recipients"][0].get("delay_reason", "")
        )

    await threads.deferToThread(postfix.wait_for, "message deferred with 451", deferred_by_mailgate)
    [entry] = postfix.queue()
    assert entry["sender"] == "app@example.com"
    assert "status=deferred" in postfix.log()
    assert "bounced" not in postfix.log()

    retried = gateway.api.next_request()
    retried.addTimeout(WAIT, reactor)
    await threads.deferToThread(postfix.must, "postqueue", "-f")
    assert_relayed(await retried, "held back")
    await threads.deferToThread(postfix.wait_for, "queue empty", lambda: postfix.queue() == [])
    assert "status=sent (250 2.0.0 Ok: fake-2)" in postfix.log()
    assert "bounced" not in postfix.log()
    assert len(gateway.api.requests) == 2
    gateway.api.assert_script_consumed()
