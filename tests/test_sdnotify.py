"""systemd notifications: the address forms, delivery on a real datagram socket, and
READY=1 only once every listener is bound (Clock and controllable endpoints)."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from mailgate.sdnotify import Notifier, SystemdNotifier, notify_address, watchdog_interval


class Receiver:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, sock: socket.socket, env_value: str):
        self.sock = sock
        self.env_value = env_value

    def messages(self) -> list[str]:
        received = []
        self.sock.setblocking(False)
        try:
            while True:
                received.append(self.sock.recv(4096).decode("utf-8"))
        except BlockingIOError:
            return received


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"mailgate-test-{os.getpid()}-{os.urandom(4).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield Receiver(sock, "@" + name)


@pytest.fixture
def path_receiver() -> Iterator[Receiver]:
    # A short directory: AF_UNIX paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="sdn") as directory, socket.socket(
        socket.AF_UNIX, socket.SOCK_DGRAM
    ) as sock:
        path = str(Path(directory) / "notify")
        sock.bind(path)
        yield Receiver(sock, path)


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    from twisted.logger import formatEvent

    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.warn:
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def test_address_forms(warnings: list[str]) -> None:
    """A path is used as is, ``@name`` is the abstract namespace, unset means no systemd,
    and a form we cannot speak (vsock) disables notifications with a warning."""
    assert notify_address({}) is None
    assert notify_address({"NOTIFY_SOCKET": ""}) is None
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "@/org/freedesktop/systemd1/notify"}) == (
        "\0/org/freedesktop/systemd1/notify"
    )
    assert warnings == []
    assert notify_address({"NOTIFY_SOCKET": "vsock:2:1234"}) is None
    assert len(warnings) == 1 and "vsock:2:1234" in warnings[0]


def test_send_to_a_path_socket(path_receiver: Receiver) -> None:
    """All assignments travel in one datagram, newline-separated."""
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path_receiver.env_value})
    assert notifier.send("READY=1", "STATUS=Listening on 127.0.0.1:25")
    assert path_receiver.messages() == ["READY=1\nSTATUS=Listening on 127.0.0.1:25"]


def test_send_to_an_abstract_socket(abstract_receiver: Receiver) -> None:
    """``@name`` reaches a socket bound in the abstract namespace."""
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": abstract_receiver.env_value})
    assert notifier.send("STOPPING=1")
    assert abstract_receiver.messages() == ["STOPPING=1"]


def test_newline_in_a_value_cannot_add_an_assignment(abstract_receiver: Receiver) -> None:
    """A value with a newline (say an error message) stays one assignment."""
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": abstract_receiver.env_value})
    notifier.send("STATUS=bad\nREADY=1")
    assert abstract_receiver.messages() == ["STATUS=bad READY=1"]


def test_without_systemd_nothing_is_sent() -> None:
    """Not started by systemd: sending is a silent no-op."""
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert notifier.send("READY=1") is False


def test_vanished_socket_is_a_warning_not_a_crash(warnings: list[str]) -> None:
    """A notification socket that went away costs a warning, never an exception."""
    with tempfile.TemporaryDirectory(prefix="sdn") as directory:
        path = str(Path(directory) / "gone")
        notifier = Notifier(path)
        assert notifier.send("READY=1") is False
        assert Notifier("\0mailgate-test-nobody-listens").send("STOPPING=1") is False
    assert len(warnings) == 2
    assert "READY=1 not delivered to " + path in warnings[0]
    assert "@mailgate-test-nobody-listens" in warnings[1]


class RecordingNotifier(Notifier):
    def __init__(self, watchdog: float | None = None) -> None:
        super().__init__("\0unused", watchdog)
        self.sent: list[tuple[str, ...]] = []

    def send(self, *assignments: str) -> bool:
        self.sent.append(assignments)
        return True


class FakePort:
    def __init__(self, address: Any):
        self.address = address

    def getHost(self) -> Any:
        return self.address

    def stopListening(self) -> None:
        pass


class ControlledEndpoint:
    """listen() answers when the test says so, like a slow or adopted socket."""

    def __init__(self) -> None:
        self.listening: defer.Deferred[FakePort] = defer.Deferred()

    def listen(self, factory: Any) -> defer.Deferred[FakePort]:
        return self.listening


def gateway_with(notifier: Notifier, clock: Clock, *endpoints: ControlledEndpoint) -> MultiService:
    top = MultiService()
    inner = MultiService()
    inner.setServiceParent(top)
    SystemdNotifier(notifier, clock).setServiceParent(top)  # Before the listeners, on purpose.
    for endpoint in endpoints:
        StreamServerEndpointService(endpoint, factory=None).setServiceParent(inner)
    return top


def running_gateway(*endpoints: ControlledEndpoint) -> tuple[MultiService, RecordingNotifier]:
    """Started, and one reactor turn later, when the notifier looks for listeners."""
    clock, notifier = Clock(), RecordingNotifier()
    top = gateway_with(notifier, clock, *endpoints)
    top.startService()
    clock.advance(0)
    return top, notifier


def test_ready_only_after_every_listener_is_bound() -> None:
    """READY=1 waits for the last listener (even one added after the notifier), and the
    status names every bound address."""
    first, second = ControlledEndpoint(), ControlledEndpoint()
    top, notifier = running_gateway(first, second)
    first.listening.callback(FakePort(IPv4Address("TCP", "127.0.0.1", 2525)))
    assert notifier.sent == []
    second.listening.callback(FakePort(IPv6Address("TCP", "::1", 2587)))
    assert notifier.sent == [("READY=1", "STATUS=Listening on 127.0.0.1:2525, [::1]:2587")]
    top.stopService()
    assert notifier.sent[-1] == ("STOPPING=1", "STATUS=Shutting down")


def test_failed_listener_never_reports_ready(logged_errors: Any) -> None:
    """A listener that fails to bind leaves mailgate unready: systemd fails the start
    (after TimeoutStartSec) instead of believing the gateway serves mail."""
    good, bad = ControlledEndpoint(), ControlledEndpoint()
    _, notifier = running_gateway(good, bad)
    good.listening.callback(FakePort(IPv4Address("TCP", "127.0.0.1", 2525)))
    bad.listening.errback(OSError("Address already in use"))
    assert notifier.sent == [("STATUS=A listener failed to start; see the log",)]
    assert len(logged_errors.take()) == 1  # StreamServerEndpointService's own report.


def test_stop_before_the_first_turn_sends_only_stopping() -> None:
    """Stopped before the reactor ran: no READY=1 afterwards, STOPPING=1 at once."""
    clock, notifier = Clock(), RecordingNotifier()
    endpoint = ControlledEndpoint()
    top = gateway_with(notifier, clock, endpoint)
    top.startService()
    top.stopService()
    clock.advance(0)
    endpoint.listening.callback(FakePort(IPv4Address("TCP", "127.0.0.1", 2525)))
    assert notifier.sent == [("STOPPING=1", "STATUS=Shutting down")]


def test_without_systemd_the_service_does_nothing() -> None:
    """No $NOTIFY_SOCKET: nothing is scheduled on the clock."""
    clock = Clock()
    top = gateway_with(Notifier(None), clock, ControlledEndpoint())
    top.startService()
    assert clock.getDelayedCalls() == []


# -- the watchdog (WatchdogSec=) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "60000000"}, 60.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "4242"}, 60.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),  # Another process is watched.
    ],
)
def test_watchdog_interval(environ: dict[str, str], interval: float | None) -> None:
    """$WATCHDOG_USEC in microseconds, for us only when $WATCHDOG_PID is unset or ours."""
    assert watchdog_interval(environ, pid=4242) == interval


def test_malformed_watchdog_interval_is_reported_and_ignored() -> None:
    warnings: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.warn:
            warnings.append(event["log_format"].format(**event))

    globalLogPublisher.addObserver(observe)
    try:
        assert watchdog_interval({"WATCHDOG_USEC": "soon"}, pid=1) is None
        assert watchdog_interval({"WATCHDOG_USEC": "0"}, pid=1) is None
    finally:
        globalLogPublisher.removeObserver(observe)
    assert warnings == [
        "WATCHDOG_USEC='soon' is not a positive number: systemd watchdog disabled",
        "WATCHDOG_USEC='0' is not a positive number: systemd watchdog disabled",
    ]


def test_from_environment_reads_the_watchdog_only_with_a_socket() -> None:
    """Without $NOTIFY_SOCKET there is nobody to send keep-alives to."""
    watched = {"NOTIFY_SOCKET": "@mailgate-test", "WATCHDOG_USEC": "2000000"}
    assert Notifier.from_environment(watched, pid=7).watchdog == 2.0
    assert Notifier.from_environment({"WATCHDOG_USEC": "2000000"}, pid=7).watchdog is None
    assert Notifier.from_environment({**watched, "WATCHDOG_PID": str(os.getpid())}).watchdog == 2.0


def test_watchdog_keepalives_every_half_interval_until_stop() -> None:
    """WATCHDOG=1 at start and every half interval from the reactor's clock (a hung
    reactor sends none, and systemd restarts the service); none after STOPPING=1."""
    clock, notifier = Clock(), RecordingNotifier(watchdog=60.0)
    top = gateway_with(notifier, clock, ControlledEndpoint())
    top.startService()
    assert notifier.sent == [("WATCHDOG=1",)]
    clock.advance(29.9)
    assert len(notifier.sent) == 1
    clock.advance(0.1)
    clock.advance(30)
    assert notifier.sent == [("WATCHDOG=1",)] * 3
    top.stopService()
    assert notifier.sent[-1] == ("STOPPING=1", "STATUS=Shutting down")
    assert clock.getDelayedCalls() == []
    clock.advance(300)
    assert notifier.sent.count(("WATCHDOG=1",)) == 3


def test_no_keepalives_without_a_watchdog() -> None:
    """No WatchdogSec= (no $WATCHDOG_USEC): nothing but READY=1 and STOPPING=1."""
    first = ControlledEndpoint()
    top, notifier = running_gateway(first)
    first.listening.callback(FakePort(IPv4Address("TCP", "127.0.0.1", 2525)))
    top.stopService()
    assert [sent[0] for sent in notifier.sent] == ["READY=1", "STOPPING=1"]
