"""The gateway as users start it: ``twistd mailgate`` in a real process.

Plugin discovery, the development default from an empty directory (a real
client sends through it and the captured request appears), and configuration
errors that stop start-up with one clear line and no traceback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import smtplib
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_plugin_is_discovered() -> None:
    """``twistd mailgate --help`` finds the plugin and documents --config."""
    completed = subprocess.run(
        [*TWISTD, "mailgate", "--help"], capture_output=True, text=True, env=run_env(), timeout=60, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert "--config=" in completed.stdout
    assert "development default" in completed.stdout


def wait_for_port(port: int, deadline: float) -> None:
    import socket

    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listening on 127.0.0.1:{port}")


@pytest.fixture
def dev_gateway(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    process = subprocess.Popen(
        [*TWISTD, "-n", "--pidfile=", "mailgate"],
        cwd=tmp_path,
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        for port in (2525, 2587, 2465):
            wait_for_port(port, deadline)
        yield process, tmp_path
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def test_development_default_from_empty_directory(dev_gateway: tuple[subprocess.Popen[str], Path]) -> None:
    """With no configuration, twistd serves 2525/2587/2465 on loopback with a generated
    certificate and account, and a message sent over 2587 lands in the capture folder."""
    process, directory = dev_gateway
    state = directory / "mailgate-dev"
    password = (state / "dev-password").read_text().strip()
    assert (state / "tls" / "dev-cert.pem").exists()
    assert password not in (state / "accounts.toml").read_text()
    context = ssl.create_default_context(cafile=str(state / "tls" / "dev-cert.pem"))
    with smtplib.SMTP("127.0.0.1", 2587, local_hostname="client.example", timeout=10) as client:
        client.starttls(context=context)
        client.login("dev", password)
        refused = client.sendmail("me@example.com", ["you@example.org"], b"Subject: first\r\n\r\nhello\r\n")
    assert refused == {}
    captured = list((state / "captured").glob("*.json"))
    assert len(captured) == 1
    document = json.loads(captured[0].read_text())
    assert document["body"]["subject"] == "first"
    assert document["body"]["envelope"] == {"mail_from": "me@example.com", "rcpt_to": ["you@example.org"]}
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=15)
    # twistd stops cleanly, then re-raises SIGTERM so its exit status says why it stopped.
    assert process.returncode == -signal.SIGTERM
    assert "Server Shut Down." in output
    # The development login is logged (issue 2), so a newcomer can send at once.
    assert f"development mode: log in as 'dev' with password {password!r}" in output
    assert "Traceback" not in output


def run_to_exit(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``twistd -n mailgate --config CONFIG`` for a start-up expected to fail."""
    return subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "mailgate", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("[server]\nhostname = 1\n", "server.hostname: must be a string"),
        ("[[listeners]]\nendpoint = \"tcp:2599\"\nrole = \"mx\"\n", "listeners[0].role: must be one of relay, submission, submissions"),
        ("not toml [", "not valid TOML"),
        (
            "[[listeners]]\nendpoint = \"tcp:0\"\nrole = \"submission\"\n[accounts]\npath = \"a.toml\"\n"
            "[providers.main]\ntype = \"webhook\"\nurl = \"https://api.example.com\"\ntoken = \"env:MAILGATE_UNSET_TOKEN\"\n",
            "providers.main.token: environment variable MAILGATE_UNSET_TOKEN is not set",
        ),
    ],
)
def test_configuration_error_is_one_line_without_traceback(tmp_path: Path, config: str, message: str) -> None:
    """A bad configuration stops start-up with a non-zero exit and one line naming the key."""
    path = tmp_path / "mailgate.toml"
    path.write_text(config)
    env = run_env()
    env.pop("MAILGATE_UNSET_TOKEN", None)
    completed = run_to_exit(path, env)
    assert completed.returncode != 0
    assert "Traceback" not in completed.stdout + completed.stderr
    assert message in completed.stderr


def test_unusable_state_directory_is_one_line(tmp_path: Path) -> None:
    """A development state directory that cannot be created stops start-up with one line."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    completed = subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "mailgate", "--state-dir", str(blocker / "state")],
        capture_output=True,
        text=True,
        env=run_env(),
        timeout=60,
        check=False,
    )
    assert completed.returncode != 0
    assert "Traceback" not in completed.stdout + completed.stderr
    assert completed.stderr.startswith("mailgate: error: ")


def test_port_in_use_is_one_line_without_traceback(tmp_path: Path) -> None:
    """A listener whose port is taken stops start-up with exit 1 and one line saying which."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "mailgate.toml"
        path.write_text(
            f'[server]\nhostname = "mx.test"\nstate_dir = "state"\n'
            f'[[listeners]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\nrole = "relay"\n'
            'trusted_networks = ["127.0.0.0/8"]\n'
            '[accounts]\nstore = "passthrough"\nprovider = "capture"\npassword_settings = ["token"]\n'
            '[providers.capture]\ntype = "capture"\nfolder = "captured"\n'
        )
        completed = run_to_exit(path, run_env())
    output = completed.stdout + completed.stderr
    assert completed.returncode == 1
    assert "Traceback" not in output
    assert f"mailgate: error: cannot listen on 127.0.0.1:{port}: Address already in use" in output
