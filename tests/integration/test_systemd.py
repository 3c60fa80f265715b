"""mailgate under systemd: the shipped units pass ``systemd-analyze verify``, a real
``twistd mailgate`` says READY=1 on a real notification socket only once it accepts
connections (and STOPPING=1 on SIGTERM), and sockets passed the way systemd passes
them (mailgate.socket) become the listeners in ListenStream= order."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import TEST_API_TOKEN, write_config
from tests.integration.test_twistd import REPO, TWISTD, run_env, run_to_exit

INSTALLED_TWISTD = "/opt/mailgate/bin/twistd"
READY_TIMEOUT = 60.0


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is required (apt-get install systemd)")
    return path


def verify(directory: Path, *units: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze(), "verify", "--man=no", "--recursive-errors=no", *(str(directory / u) for u in units)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def copy_units(directory: Path, service_text: str | None = None) -> None:
    """The shipped units, with ExecStart= pointing at this environment's twistd
    (systemd-analyze checks that the program exists)."""
    twistd = Path(sys.executable).with_name("twistd")
    assert twistd.exists(), f"{twistd} missing: Twisted's twistd script is installed with the package"
    service = service_text if service_text is not None else (REPO / "etc" / "mailgate.service").read_text()
    (directory / "mailgate.service").write_text(service.replace(INSTALLED_TWISTD, str(twistd)))
    shutil.copy(REPO / "etc" / "mailgate.socket", directory / "mailgate.socket")


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts mailgate.service and mailgate.socket without a
    word about them, and the service runs the documented command line."""
    service = (REPO / "etc" / "mailgate.service").read_text()
    assert (
        f"ExecStart={INSTALLED_TWISTD} --nodaemon --pidfile= mailgate --config /etc/mailgate/mailgate.toml"
        in service.splitlines()
    )
    copy_units(tmp_path)
    completed = verify(tmp_path, "mailgate.socket", "mailgate.service")
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert [line for line in output.splitlines() if "mailgate." in line] == []


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check is not vacuous here: a misspelt hardening option fails it."""
    service = (REPO / "etc" / "mailgate.service").read_text().replace("NoNewPrivileges=", "NoNewPrivilege=")
    copy_units(tmp_path, service)
    completed = verify(tmp_path, "mailgate.service")
    assert completed.returncode != 0
    assert "Unknown key 'NoNewPrivilege'" in completed.stderr


# -- readiness notifications from a real twistd ---------------------------------------------


@pytest.fixture(params=["abstract", "path"])
def notify_socket(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's, and the $NOTIFY_SOCKET naming it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        if request.param == "abstract":
            name = f"mailgate-test-{os.getpid()}-{os.urandom(4).hex()}"
            receiver.bind("\0" + name)
            receiver.settimeout(READY_TIMEOUT)
            yield receiver, "@" + name
        else:
            with tempfile.TemporaryDirectory(prefix="sdn") as directory:  # AF_UNIX paths are short.
                path = os.path.join(directory, "notify")
                receiver.bind(path)
                receiver.settimeout(READY_TIMEOUT)
                yield receiver, path


def gateway_config(tmp_path: Path, tls_files: tuple[Path, Path, Path], listeners: str | None = None) -> Path:
    config = write_config(tmp_path, tls_files, "http://127.0.0.1:9")  # The API is never reached here.
    if listeners is not None:
        text = config.read_text()
        start = text.index("[[listeners]]")
        config.write_text(text[:start] + listeners + text[text.index("[delivery]") :])
    (tmp_path / "accounts.toml").write_text("")
    return config


def start_twistd(
    command: list[str], tmp_path: Path, notify: str, extra_env: dict[str, str] | None = None, **kwargs: object
) -> subprocess.Popen[str]:
    env = run_env()
    env.pop("WATCHDOG_USEC", None)  # Only where a test asks for the watchdog.
    env.pop("WATCHDOG_PID", None)
    env["NOTIFY_SOCKET"] = notify
    env.update(extra_env or {})
    env["MAILGATE_TEST_API_TOKEN"] = TEST_API_TOKEN
    with open(tmp_path / "twistd.log", "w") as log:  # The child keeps its own descriptor.
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, **kwargs)  # type: ignore[call-overload]


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)


def read_greeting(port: int, context: ssl.SSLContext | None = None) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        if context is None:
            return raw.recv(1024)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.recv(1024)


def test_ready_once_listening_and_stopping_on_sigterm(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], notify_socket: tuple[socket.socket, str]
) -> None:
    """READY=1 arrives when every listener accepts connections, with a status line
    naming them; SIGTERM brings STOPPING=1, then a clean exit."""
    receiver, notify = notify_socket
    config = gateway_config(tmp_path, tls_files)
    process = start_twistd([*TWISTD, "-n", "--pidfile=", "mailgate", "--config", str(config)], tmp_path, notify)
    try:
        ready = receiver.recv(4096).decode("utf-8").split("\n")
        assert ready[0] == "READY=1"
        assert re.fullmatch(r"STATUS=Listening on 127\.0\.0\.1:\d+, 127\.0\.0\.1:\d+, 127\.0\.0\.1:\d+", ready[1])
        submission, submissions, relay = (int(port) for port in re.findall(r":(\d+)", ready[1]))
        assert read_greeting(submission) == b"220 localhost ESMTP mailgate\r\n"
        context = ssl.create_default_context(cafile=str(tls_files[2]))
        assert read_greeting(submissions, context) == b"220 localhost ESMTP mailgate\r\n"
        assert read_greeting(relay) == b"220 localhost ESMTP mailgate\r\n"
        process.send_signal(signal.SIGTERM)
        assert receiver.recv(4096).decode("utf-8") == "STOPPING=1\nSTATUS=Shutting down"
        assert process.wait(timeout=30) == -signal.SIGTERM
    finally:
        stop(process)
    assert "Traceback" not in (tmp_path / "twistd.log").read_text()


@pytest.mark.parametrize("notify_socket", ["abstract"], indirect=True)
def test_watchdog_keepalives_until_stopping(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], notify_socket: tuple[socket.socket, str]
) -> None:
    """With $WATCHDOG_USEC (WatchdogSec=1s), a real twistd sends WATCHDOG=1 about every
    half second, and none after STOPPING=1."""
    receiver, notify = notify_socket
    config = gateway_config(tmp_path, tls_files)
    command = [*TWISTD, "-n", "--pidfile=", "mailgate", "--config", str(config)]
    process = start_twistd(command, tmp_path, notify, {"WATCHDOG_USEC": "1000000"})
    try:
        received: list[str] = []
        keepalives: list[float] = []
        while len(keepalives) < 4 or not any(m.startswith("READY=1") for m in received):
            received.append(receiver.recv(4096).decode("utf-8"))
            if received[-1] == "WATCHDOG=1":
                keepalives.append(time.monotonic())
        assert 1.4 <= keepalives[3] - keepalives[0] < 10  # Periodic, not a burst.
        process.send_signal(signal.SIGTERM)
        while received[-1] != "STOPPING=1\nSTATUS=Shutting down":
            received.append(receiver.recv(4096).decode("utf-8"))
        assert process.wait(timeout=30) == -signal.SIGTERM
        receiver.settimeout(1.5)  # Three would-be keep-alive periods.
        with pytest.raises(TimeoutError):
            received.append(receiver.recv(4096).decode("utf-8"))
    finally:
        stop(process)
    others = [m for m in received if m != "WATCHDOG=1"]
    assert len(others) == 2 and others[0].startswith("READY=1\n") and others[1].startswith("STOPPING=1")


# -- socket activation ----------------------------------------------------------------------

# Passes listening sockets as systemd does (sd_listen_fds(3)): descriptors 3, 4, 5...
# in order, LISTEN_FDS, LISTEN_PID of the process that then runs the command, and
# LISTEN_FDNAMES (the socket unit's name for each, by default).
LAUNCHER = """
import os, sys
count = int(sys.argv[1])
inherited = [int(fd) for fd in sys.argv[2 : 2 + count]]
held = [os.dup(fd) for fd in inherited]
for fd in inherited:
    os.close(fd)
for index, fd in enumerate(held):  # Ascending, so no source is overwritten before use.
    os.dup2(fd, 3 + index)
    os.set_inheritable(3 + index, True)
for fd in held:
    if fd >= 3 + count:
        os.close(fd)
os.environ["LISTEN_FDS"] = str(count)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDNAMES"] = ":".join(["mailgate.socket"] * count)
command = sys.argv[2 + count :]
os.execv(command[0], command)
"""

SOCKET_LISTENERS = """
[[listeners]]
endpoint = "systemd:domain=INET:index=0"
role = "relay"
trusted_networks = ["127.0.0.1/32"]

[[listeners]]
endpoint = "systemd:domain=INET:index=1"
role = "submission"

[[listeners]]
endpoint = "systemd:domain=INET:index=2"
role = "submissions"

"""


def test_socket_activation_maps_indexes_to_listeners(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], notify_socket: tuple[socket.socket, str]
) -> None:
    """Sockets passed by the service manager become the listeners: index N is the Nth
    ListenStream= line (25 relay, 587 submission, 465 submissions in mailgate.socket)."""
    receiver, notify = notify_socket
    config = gateway_config(tmp_path, tls_files, SOCKET_LISTENERS)
    sockets = []
    for _ in range(3):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sockets.append(sock)
    ports = [sock.getsockname()[1] for sock in sockets]
    fds = [sock.fileno() for sock in sockets]
    command = [sys.executable, "-c", LAUNCHER, "3", *map(str, fds), *TWISTD, "-n", "--pidfile=", "mailgate"]
    process = start_twistd([*command, "--config", str(config)], tmp_path, notify, pass_fds=fds)
    for sock in sockets:
        sock.close()  # Only mailgate holds them now, as with systemd.
    try:
        ready = receiver.recv(4096).decode("utf-8").split("\n")
        assert ready == ["READY=1", "STATUS=Listening on " + ", ".join(f"127.0.0.1:{port}" for port in ports)]
        relay, submission, submissions = ports
        with smtplib.SMTP("127.0.0.1", relay, local_hostname="client.example", timeout=30) as client:
            client.ehlo()
            assert client.mail("app@example.com")[0] == 250  # relay: trusted network, no AUTH
        with smtplib.SMTP("127.0.0.1", submission, local_hostname="client.example", timeout=30) as client:
            client.ehlo()
            assert client.has_extn("starttls")
            assert client.mail("app@example.com")[0] == 530  # submission: AUTH first
        context = ssl.create_default_context(cafile=str(tls_files[2]))
        assert read_greeting(submissions, context) == b"220 localhost ESMTP mailgate\r\n"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == -signal.SIGTERM
    finally:
        stop(process)
    assert "Traceback" not in (tmp_path / "twistd.log").read_text()


def test_socket_listener_without_socket_is_one_line(tmp_path: Path, tls_files: tuple[Path, Path, Path]) -> None:
    """Started without mailgate.socket, a systemd: listener stops start-up with one line
    that says what is missing."""
    config = gateway_config(tmp_path, tls_files, SOCKET_LISTENERS)
    env = run_env()
    env["MAILGATE_TEST_API_TOKEN"] = TEST_API_TOKEN
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(name, None)
    completed = run_to_exit(config, env)
    assert completed.returncode == 1
    assert "Traceback" not in completed.stdout + completed.stderr
    assert completed.stderr.startswith(
        "mailgate: configuration error: listeners[0].endpoint: invalid endpoint string: "
        "systemd passed no such socket (0 passed)"
    )
