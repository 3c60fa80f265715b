"""The admin HTTP listener: ``/healthz``, ``/readyz`` and ``/metrics``.

``[admin] endpoint`` (a Twisted endpoint string, loopback by default in the
example) serves a small ``twisted.web`` resource tree:

* ``/healthz``: ``200 ok`` while the process serves requests at all (liveness);
* ``/readyz``: ``200 ready`` when every readiness check passes, else ``503``
  naming the failing ones (``not ready: listeners, state_dir``); a load
  balancer or orchestrator sends mail here only when it is 200.  A check
  returns a bool or a Deferred of one: one that touches the disk runs in a
  thread, so a probe never stalls the SMTP sessions on a slow disk;
* ``/metrics``: the service's Prometheus registry (:mod:`mailgate.metrics`), as
  text format or OpenMetrics, whichever the scraper's ``Accept`` asks for.

With ``[admin] token`` set, every path needs ``Authorization: Bearer <token>``
(RFC 6750); the comparison takes constant time.  Requests are not logged: a
scraper every few seconds would drown the mail log.
"""

from __future__ import annotations

import hmac
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

__all__ = ["AdminRoot", "AdminSite", "admin_site", "directory_writable", "failing_checks"]

log = Logger()

Check = Callable[[], "bool | defer.Deferred[bool]"]


def directory_writable(path: Path) -> bool:
    """True when a file can be created (and removed) in ``path`` right now.

    A real write, not :func:`os.access`: it also catches a read-only remount
    and a directory that vanished.
    """
    try:
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def failing_checks(checks: Mapping[str, Check]) -> defer.Deferred[list[str]]:
    """Fires with the names of the checks that do not pass, in order; the checks
    run concurrently, and one that raises (or fails) fails, and is logged."""

    def run(name: str, check: Check) -> defer.Deferred[bool]:
        def broken(failure: Any) -> bool:
            # A broken check means "not ready", and is worth a traceback.
            log.failure("readiness check {check} raised", failure, check=name)
            return False

        return defer.maybeDeferred(check).addCallbacks(bool, broken)

    names = list(checks)
    results = defer.gatherResults([run(name, check) for name, check in checks.items()])
    return results.addCallback(lambda passed: [name for name, ok in zip(names, passed, strict=True) if not ok])


def _plain(request: Any, status: int, text: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    return text.encode("utf-8")


class _Page(Resource):
    """A leaf answering GET (and HEAD, which Twisted derives from it); other methods are 405.

    Twisted's own 405 page is built by a deprecated class; this one is plain text.
    """

    isLeaf = True

    def render(self, request: Any) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return _plain(request, 405, "method not allowed\n")
        return self.render_GET(request)

    def render_GET(self, request: Any) -> bytes:
        raise NotImplementedError


class _Text(_Page):
    def __init__(self, status: int, text: str, headers: Mapping[bytes, bytes] | None = None):
        super().__init__()
        self.status, self.text, self.headers = status, text, dict(headers or {})

    def render_GET(self, request: Any) -> bytes:
        for name, value in self.headers.items():
            request.setHeader(name, value)
        return _plain(request, self.status, self.text)


class _Health(_Page):
    def render_GET(self, request: Any) -> bytes:
        return _plain(request, 200, "ok\n")


class _Ready(_Page):
    def __init__(self, checks: Mapping[str, Check]):
        super().__init__()
        self.checks = checks

    def render_GET(self, request: Any) -> Any:
        answer = failing_checks(self.checks).addCallback(self._answer, request)
        if answer.called:  # Every check answered at once.
            return answer.result
        finished = request.notifyFinish()  # Fires (with an error) if the client goes away first.
        gone: list[bool] = []
        finished.addErrback(lambda _: gone.append(True))

        def write(body: bytes) -> None:
            if not gone:
                request.setHeader(b"Content-Length", b"%d" % len(body))
                request.write(body)
                request.finish()

        answer.addCallback(write)
        return NOT_DONE_YET

    @staticmethod
    def _answer(failing: list[str], request: Any) -> bytes:
        if failing:
            return _plain(request, 503, f"not ready: {', '.join(failing)}\n")
        return _plain(request, 200, "ready\n")


class _Metrics(_Page):
    def __init__(self, registry: CollectorRegistry):
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Any) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return encoder(self.registry)


_UNAUTHORIZED = _Text(401, "unauthorized\n", {b"WWW-Authenticate": b'Bearer realm="mailgate admin"'})
_NOT_FOUND = _Text(404, "not found: try /healthz, /readyz or /metrics\n")


class AdminRoot(Resource):
    """The resource tree; checks the bearer token before any child is reached."""

    def __init__(self, checks: Mapping[str, Check], registry: CollectorRegistry, token: str | None = None):
        super().__init__()
        self.token = token.encode("ascii") if token is not None else None
        self.putChild(b"healthz", _Health())
        self.putChild(b"readyz", _Ready(checks))
        self.putChild(b"metrics", _Metrics(registry))

    def _authorized(self, request: Any) -> bool:
        if self.token is None:
            return True
        scheme, _, credentials = (request.getHeader(b"authorization") or b"").partition(b" ")
        # RFC 6750 §2.1 / RFC 9110 §11.1: the scheme name is case-insensitive.
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token)

    def getChildWithDefault(self, path: bytes, request: Any) -> Resource:
        if not self._authorized(request):
            return _UNAUTHORIZED
        return self.children.get(path, _NOT_FOUND)


class AdminSite(Site):
    """A Site that keeps no access log and never shows a traceback."""

    noisy = False
    displayTracebacks = False

    def log(self, request: Any) -> None:
        pass


def admin_site(checks: Mapping[str, Check], registry: CollectorRegistry, token: str | None) -> AdminSite:
    # Idle keep-alive connections from scrapers are closed after a minute.
    return AdminSite(AdminRoot(checks, registry, token), timeout=60)
