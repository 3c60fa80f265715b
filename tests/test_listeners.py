"""Listener names, and what build_service wires for operations: readiness checks
and the admin listener, on a MemoryReactor (no sockets)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ProcessDone
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from mailgate import spoolchild
from mailgate.accounts.memory import MemoryAccountStore
from mailgate.admin import failing_checks
from mailgate.build import build_service
from mailgate.circuit import CircuitPolicy
from mailgate.config import ConfigError, parse_config
from mailgate.listeners import describe_address, listener_names


class InlinePool:
    """A thread pool that runs each call at once, and remembers what it ran."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        self.ran.append(f.__name__)
        try:
            result = f(*args, **kwargs)
        except Exception:  # noqa: BLE001 - handed back, as a real pool does
            on_result(False, Failure())
        else:
            on_result(True, result)


class StubProcess:
    """Stands in for the spool writer process: answers every request "done" (these
    tests spool no message: only the writer's start-up check comes), ends when its
    input closes."""

    pid = 0

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.requests: list[tuple[bytes, str, bytes]] = []
        self.buffer = bytearray()
        protocol.makeConnection(self)

    def write(self, data: bytes) -> None:
        self.buffer += data
        for op, name, body in spoolchild.decode_requests(self.buffer):
            self.requests.append((op, name, body))
            self.protocol.childDataReceived(1, spoolchild.encode_reply(op, name, 0))

    def closeStdin(self) -> None:
        self.protocol.processEnded(Failure(ProcessDone(0)))


class ProcessReactor(MemoryReactorClock):
    """A MemoryReactorClock that records processes instead of starting them."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[list[str]] = []
        self.processes: list[StubProcess] = []

    def spawnProcess(self, protocol: Any, executable: str, args: Any = (), *more: Any, **options: Any) -> StubProcess:
        self.spawned.append(list(args))
        self.processes.append(StubProcess(protocol))
        return self.processes[-1]


class PoolReactor(ProcessReactor):
    """A ProcessReactor with a thread pool (the readiness probe's disk work goes there)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = InlinePool()

    def getThreadPool(self) -> InlinePool:
        return self.pool

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


def config(tmp_path: Path, **extra: Any) -> Any:
    return parse_config(
        {
            "server": {"hostname": "mx.test", "state_dir": str(tmp_path / "state")},
            "listeners": [
                {"endpoint": "tcp:25", "role": "relay"},
                {"endpoint": "tcp:587", "role": "submission"},
                {"endpoint": "tcp:2525:interface=127.0.0.1", "role": "relay"},
            ],
            "accounts": {"store": "file", "path": "accounts.toml"},
            "providers": {"main": {"type": "webhook", "url": "https://api.example.com/v1"}},
            **extra,
        },
        base_dir=tmp_path,
    )


def test_listener_names_are_roles_numbered_only_when_shared(tmp_path: Path) -> None:
    """A role used once is the name; a shared role gets its position in the file."""
    assert listener_names(config(tmp_path).listeners) == ["relay-0", "submission", "relay-2"]


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (IPv4Address("TCP", "127.0.0.1", 587), "127.0.0.1:587"),
        (IPv6Address("TCP", "::1", 465), "[::1]:465"),
        (UNIXAddress("/run/mailgate.sock"), "UNIXAddress('/run/mailgate.sock')"),
    ],
)
def test_describe_address(address: Any, text: str) -> None:
    """Addresses are written the way operators type them."""
    assert describe_address(address) == text


def test_readiness_follows_the_listeners(tmp_path: Path) -> None:
    """listeners_up is False before start and after stop, True while every port is bound;
    each bound listener logs one line with its name and address."""
    reactor = PoolReactor()
    (tmp_path / "state").mkdir()
    events: list[dict[str, Any]] = []
    service = build_service(config(tmp_path), reactor, None, store=MemoryAccountStore({}))
    assert not service.listeners_up()
    assert failing_checks(service.readiness).result == ["listeners"]
    globalLogPublisher.addObserver(events.append)
    try:
        service.startService()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert service.listeners_up()
    reactor.pool.ran.clear()
    assert failing_checks(service.readiness).result == []
    assert reactor.pool.ran == ["directory_writable"]  # The write probe, off the reactor thread.
    assert [e["listener"] for e in events if e.get("log_format", "").startswith("listener ")] == [
        "relay-0", "submission", "relay-2",
    ]  # fmt: skip
    assert [port for port, *_ in reactor.tcpServers] == [25, 587, 2525]
    service.stopService()
    assert not service.listeners_up()


def test_admin_listener_is_wired_when_configured(tmp_path: Path) -> None:
    """[admin] endpoint adds one more listening service; without it there is none."""
    reactor = ProcessReactor()
    with_admin = config(tmp_path, admin={"endpoint": "tcp:9025:interface=127.0.0.1"})
    build_service(with_admin, reactor, None, store=MemoryAccountStore({})).startService()
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers][-1] == (9025, "127.0.0.1")
    assert len(reactor.tcpServers) == 4
    [writer] = reactor.spawned  # the spool writer process, on this server's spool, checked at start
    assert writer[-2:] == [str(tmp_path / "state" / "queue" / "tmp"), str(tmp_path / "state" / "queue" / "messages")]
    assert [(op, name) for op, name, _ in reactor.processes[0].requests] == [(b"D", "startupcheck")]
    plain = ProcessReactor()
    # Its own state directory: the first server, still running, holds the queue lock of its own.
    other_state = {"hostname": "mx.test", "state_dir": str(tmp_path / "state2")}
    build_service(config(tmp_path, server=other_state), plain, None, store=MemoryAccountStore({})).startService()
    assert len(plain.tcpServers) == 3


def test_bad_admin_endpoint_names_the_key(tmp_path: Path) -> None:
    """An admin endpoint Twisted cannot parse stops start-up naming admin.endpoint."""
    with pytest.raises(ConfigError, match=r"^admin\.endpoint: invalid endpoint string"):
        build_service(config(tmp_path, admin={"endpoint": "tcp:nine"}), ProcessReactor(), None, store=MemoryAccountStore({}))


def test_routes_check_follows_the_circuit_breakers(tmp_path: Path) -> None:
    """The routes check fails while every provider of the default route has its circuit
    open (or none is configured), and passes again once a probe may go through."""
    reactor = ProcessReactor()
    service = build_service(config(tmp_path), reactor, None, store=MemoryAccountStore({}))
    dispatcher = service.dispatcher
    assert service.readiness["routes"]()
    breaker = dispatcher.breakers["main"]
    for _ in range(breaker.policy.failures):
        breaker.record_failure()
    assert not service.readiness["routes"]()
    reactor.advance(breaker.policy.cooldown)
    assert service.readiness["routes"]()
    dispatcher.replace_routes({}, ("main",))
    assert not service.readiness["routes"]()


def test_reload_keeps_breakers_and_gates_of_unchanged_providers(tmp_path: Path) -> None:
    """A reload keeps a provider's open circuit and its in-flight count when its limits and
    circuit policy are unchanged, and starts afresh for a changed or new provider."""
    reactor = ProcessReactor()
    service = build_service(config(tmp_path), reactor, None, store=MemoryAccountStore({}))
    dispatcher = service.dispatcher
    breaker, gate = dispatcher.breakers["main"], dispatcher.gates["main"]
    routes = dict(dispatcher.providers)
    dispatcher.replace_routes(routes, ("main",))
    assert (dispatcher.breakers["main"], dispatcher.gates["main"]) == (breaker, gate)
    changed = dataclasses.replace(routes["main"], circuit=CircuitPolicy(failures=9))
    dispatcher.replace_routes({"main": changed, "other": routes["main"]}, ("main", "other"))
    assert dispatcher.breakers["main"] is not breaker and dispatcher.breakers["main"].policy.failures == 9
    assert dispatcher.gates["main"] is gate
    assert set(dispatcher.breakers) == set(dispatcher.gates) == {"main", "other"}


def test_reload_applies_limits_to_the_message_rate_and_the_parser(tmp_path: Path) -> None:
    """Reloaded [limits]: the default per-account message rate, the MIME limits of
    new sessions' parser and their policies' limits all follow."""
    from mailgate.message import MessageParseError
    from mailgate.ratelimit import MessageRate

    reactor = ProcessReactor()
    (tmp_path / "state").mkdir()
    reloaded = config(tmp_path, limits={"max_messages_per_minute": 5, "max_addresses_per_header": 2})
    service = build_service(config(tmp_path), reactor, None, store=MemoryAccountStore({}), load=lambda: reloaded)
    assert service.message_rate.default is None
    assert service.reloader.reload()
    assert service.message_rate.default == MessageRate(5, 5)
    raw = b"From: a@example.com\r\nTo: b@example.org, c@example.org, d@example.org\r\n\r\nhi\r\n"
    for factory in service.reloader.smtp_factories:
        assert factory.policy.limits.max_addresses_per_header == 2
        with pytest.raises(MessageParseError):
            factory.parse(raw, "a@example.com", ("b@example.org",), {})
