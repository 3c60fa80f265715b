"""How ``mailgate queue`` talks to a running server: a UNIX socket in the queue directory.

Like Postfix's postqueue/postsuper talking to its master, the CLI never edits
the files of a queue a server is delivering: the server owns the entries it
holds in memory (one may be in the middle of an attempt), so a CLI edit could
race with it and send a message twice or lose a deletion.  While a server runs
(it holds the queue lock, :meth:`mailgate.spool.Spool.lock`), the CLI sends
one JSON request line to ``<state_dir>/queue/control.sock`` (mode 0600: root
or the server's user only) and reads one JSON answer line.  With no server
running, the CLI takes the lock itself and edits the files directly.

Requests: ``{"command": "list"}``, ``{"command": "show", "id": ID}``,
``{"command": "retry", "id": ID}``, ``{"command": "retry-all"}``,
``{"command": "delete", "id": ID}``, ``{"command": "flush"}``.  Answers:
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from mailgate.spool import is_queue_id

MAX_REQUEST = 4096


class ControlError(Exception):
    """A request the server refused (bad id, unknown command), or no answer."""


class ControlProtocol(LineOnlyReceiver):
    """One request line, one answer line, then close."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST
    log = Logger()

    def lineReceived(self, line: bytes) -> None:
        d = defer.maybeDeferred(self._handle, line)
        d.addCallbacks(lambda result: {"ok": True, "result": result}, self._error)
        d.addCallback(self._answer)

    def _error(self, failure: Any) -> dict[str, Any]:
        if failure.check(ControlError):
            return {"ok": False, "error": str(failure.value)}
        self.log.failure("queue control request failed", failure)
        return {"ok": False, "error": f"internal error ({failure.type.__name__})"}

    def _answer(self, document: dict[str, Any]) -> None:
        if self.transport is not None:
            self.transport.write(json.dumps(document).encode("utf-8") + b"\n")
            self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._answer({"ok": False, "error": "request too long"})

    def _handle(self, line: bytes) -> Any:
        try:
            request = json.loads(line)
            command = request["command"]
        except (ValueError, KeyError, TypeError):
            raise ControlError("malformed request") from None
        runner = self.factory.runner
        if command == "list":
            return runner.describe()
        if command == "retry-all":
            return runner.retry_all()
        if command == "flush":
            return runner.flush()
        queue_id = request.get("id")
        if not isinstance(queue_id, str) or not is_queue_id(queue_id):
            raise ControlError("not a queue id")
        if queue_id not in runner:
            raise ControlError(f"no message {queue_id} in the queue")
        if command == "show":
            return runner.describe(queue_id)[0]
        if command == "retry":
            return runner.retry_now(queue_id)
        if command == "delete":
            return runner.delete(queue_id)
        raise ControlError(f"unknown command {command!r}")


class ControlService(Service):
    """Listens on the control socket while the server runs."""

    log = Logger()

    def __init__(self, runner: Any, path: Path, reactor: Any):
        self.runner = runner
        self.path = Path(path)
        self.reactor = reactor
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        # The socket lives in the queue directory: listen once the spool is open.
        self.runner.when_open(self._listen)

    def _listen(self) -> None:
        if not self.running or self.port is not None:
            return
        # A socket file left by a killed server: we hold the queue lock, so no
        # live server can be listening on it.
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        factory = Factory.forProtocol(ControlProtocol)
        factory.runner = self.runner  # type: ignore[attr-defined]
        factory.noisy = False
        try:
            self.port = self.reactor.listenUNIX(str(self.path), factory, mode=0o600)
        except CannotListenError as e:
            # Mail still flows; only the queue CLI cannot reach this server (a UNIX
            # socket path is limited to about 100 bytes).
            self.log.error(
                "queue control socket unavailable ({error}): `mailgate queue` cannot reach this server",
                error=str(e.socketError) if e.socketError else str(e),
            )

    def stopService(self) -> Any:
        super().stopService()
        if self.port is None:
            return None
        port, self.port = self.port, None
        return port.stopListening()


def request(path: Path, command: str, queue_id: str | None = None, timeout: float = 30.0) -> Any:
    """Send one request to a running server; returns its result or raises ControlError.

    Raises ConnectionError (or FileNotFoundError) when nobody listens."""
    document: dict[str, Any] = {"command": command}
    if queue_id is not None:
        document["id"] = queue_id
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect(str(path))
        client.sendall(json.dumps(document).encode("utf-8") + b"\n")
        chunks = []
        try:
            while chunk := client.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            raise ControlError(f"no answer from the server within {timeout:g} s") from None
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise ControlError("the server closed the control connection without an answer") from None
    if not answer.get("ok"):
        raise ControlError(answer.get("error", "refused"))
    return answer["result"]
