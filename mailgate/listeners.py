"""The SMTP listeners as services: their names, and whether they are listening.

A listener's name is what logs and metrics call it: its role, with its
position in the configuration file appended when two listeners share a role
(``submission``, ``relay-0``, ``relay-3``).  Never its address: an endpoint
string can name interfaces, and metric labels hold no addresses.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.logger import Logger

from mailgate.config import ListenerConfig


def listener_names(listeners: Sequence[ListenerConfig]) -> list[str]:
    """One name per listener, in order (see the module docstring)."""
    roles = Counter(listener.role for listener in listeners)
    return [
        listener.role if roles[listener.role] == 1 else f"{listener.role}-{index}"
        for index, listener in enumerate(listeners)
    ]


def describe_address(address: Any) -> str:
    """``127.0.0.1:587``, ``[::1]:587`` or the address's own text (UNIX sockets...)."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None or port is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ListenerService(StreamServerEndpointService):
    """A listening endpoint that knows its name and whether it is bound.

    A port that cannot be bound stops start-up (``_raiseSynchronously``); once
    bound, one line says where, which is how an operator (or a test) learns a
    port chosen by the system (``tcp:0``) or passed in by systemd.
    """

    log = Logger()

    def __init__(self, name: str, endpoint: Any, factory: Any):
        super().__init__(endpoint, factory)
        self.name = name
        self.port: Any = None
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._bound)

    def _bound(self, port: Any) -> Any:
        if port is not None:
            self.port = port
            self.log.info(
                "listener {listener} on {address}", listener=self.name, address=describe_address(port.getHost())
            )
        return port

    def stopService(self) -> Any:
        self.port = None
        return super().stopService()


def all_listening(services: Iterable[ListenerService]) -> bool:
    """True when every listener is bound (the readiness of ``/readyz``)."""
    return all(service.port is not None for service in services)
