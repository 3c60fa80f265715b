"""The admin HTTP listener over a real loopback socket: health, readiness,
metrics (text and OpenMetrics), the bearer token, and the state directory check."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from mailgate.admin import AdminRoot, admin_site, directory_writable
from mailgate.metrics import Metrics

TEST_ADMIN_TOKEN = "test-admin-token-not-a-secret"


class Admin:
    def __init__(self, checks: dict[str, Callable[[], bool]], token: str | None = None):
        self.metrics = Metrics()
        self.checks = checks
        self.site = admin_site(checks, self.metrics.registry, token)
        self.port: Any = None

    async def start(self) -> None:
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.site)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}{path}"

    async def get(self, path: str, **kwargs: Any) -> tuple[int, dict[str, str], str]:
        response = await treq.get(self.url(path), persistent=False, **kwargs)
        body = await response.text("utf-8")
        headers = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
        return response.code, headers, body


@pytest_twisted.async_yield_fixture
async def admin() -> Any:
    server = Admin({"listeners": lambda: True, "state_dir": lambda: True})
    await server.start()
    yield server
    await server.port.stopListening()


@pytest_twisted.async_yield_fixture
async def guarded_admin() -> Any:
    server = Admin({"listeners": lambda: True}, token=TEST_ADMIN_TOKEN)
    await server.start()
    yield server
    await server.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_healthz_says_ok(admin: Admin) -> None:
    """/healthz answers 200 "ok" as plain text that no cache keeps."""
    code, headers, body = await admin.get("/healthz")
    assert (code, body) == (200, "ok\n")
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert headers["cache-control"] == "no-store"


@pytest_twisted.ensureDeferred
async def test_readyz_names_what_is_not_ready(admin: Admin) -> None:
    """/readyz is 200 "ready" while every check passes, else 503 naming each failing check."""
    assert (await admin.get("/readyz"))[::2] == (200, "ready\n")
    admin.checks["listeners"] = lambda: False
    admin.checks["state_dir"] = lambda: False
    assert (await admin.get("/readyz"))[::2] == (503, "not ready: listeners, state_dir\n")


@pytest_twisted.ensureDeferred
async def test_a_broken_check_means_not_ready(admin: Admin, logged_errors: Any) -> None:
    """A readiness check that raises makes /readyz 503 and is logged with its traceback."""

    def broken() -> bool:
        raise RuntimeError("check bug")

    admin.checks["routes"] = broken
    assert (await admin.get("/readyz"))[::2] == (503, "not ready: routes\n")
    [event] = logged_errors.take()
    assert event["check"] == "routes"


@pytest_twisted.ensureDeferred
async def test_readyz_waits_for_checks_that_answer_later(admin: Admin) -> None:
    """A check may answer with a Deferred (its disk work runs in a thread): /readyz
    answers once it fires, with the same status, body and headers as at once."""
    pending: list[defer.Deferred[bool]] = []

    def later() -> defer.Deferred[bool]:
        pending.append(defer.Deferred())
        return pending[-1]

    admin.checks["state_dir"] = later
    for verdict, expected in ((False, (503, "not ready: state_dir\n")), (True, (200, "ready\n"))):
        answer = defer.ensureDeferred(admin.get("/readyz"))
        while not pending:
            await deferLater(reactor, 0.01, lambda: None)
        assert not answer.called
        pending.pop().callback(verdict)
        code, headers, body = await answer
        assert (code, body) == expected
        assert headers["content-type"] == "text/plain; charset=utf-8"
        assert headers["cache-control"] == "no-store"
    admin.checks["state_dir"] = lambda: deferLater(reactor, 0.01, lambda: True)
    response = await treq.head(admin.url("/readyz"), persistent=False)
    assert (response.code, await response.content()) == (200, b"")


@pytest_twisted.ensureDeferred
async def test_a_failing_deferred_check_means_not_ready(admin: Admin, logged_errors: Any) -> None:
    """A check whose Deferred fails (a disk error in the thread) is "not ready", logged."""
    admin.checks["state_dir"] = lambda: defer.fail(OSError("I/O error"))
    assert (await admin.get("/readyz"))[::2] == (503, "not ready: state_dir\n")
    [event] = logged_errors.take()
    assert event["check"] == "state_dir"


def test_readyz_late_answer_has_a_length() -> None:
    """The late answer is sent with a Content-Length, as an immediate one is."""
    pending: defer.Deferred[bool] = defer.Deferred()
    request = DummyRequest([b"readyz"])
    resource = AdminRoot({"state_dir": lambda: pending}, Metrics().registry).getChildWithDefault(b"readyz", request)
    assert resource.render(request) == NOT_DONE_YET
    pending.callback(False)
    assert (request.responseCode, request.written, request.finished) == (503, [b"not ready: state_dir\n"], 1)
    assert request.responseHeaders.getRawHeaders(b"content-length") == [b"21"]


def test_readyz_client_gone_before_the_answer() -> None:
    """A probe that hangs up while a check is still running gets nothing written, and
    the late answer raises nothing."""
    pending: defer.Deferred[bool] = defer.Deferred()
    root = AdminRoot({"state_dir": lambda: pending}, Metrics().registry)
    request = DummyRequest([b"readyz"])
    resource = root.getChildWithDefault(b"readyz", request)
    assert resource.render(request) == NOT_DONE_YET
    request.processingFailed(Failure(ConnectionDone()))
    pending.callback(True)
    assert request.written == [] and request.finished == 0


@pytest_twisted.ensureDeferred
async def test_metrics_in_prometheus_text_format(admin: Admin) -> None:
    """/metrics serves the service's registry in the Prometheus text format."""
    admin.metrics.connection_opened("submission")
    code, headers, body = await admin.get("/metrics")
    assert code == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE mailgate_connections_total counter" in body
    assert 'mailgate_connections_total{listener="submission"} 1.0' in body


@pytest_twisted.ensureDeferred
async def test_metrics_in_openmetrics_when_asked(admin: Admin) -> None:
    """A scraper that accepts OpenMetrics gets OpenMetrics, terminated by # EOF."""
    code, headers, body = await admin.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert code == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")


@pytest_twisted.ensureDeferred
async def test_unknown_path_and_method(admin: Admin) -> None:
    """Unknown paths are 404 with a hint; POST is 405 naming the allowed methods."""
    code, _, body = await admin.get("/status")
    assert (code, body) == (404, "not found: try /healthz, /readyz or /metrics\n")
    response = await treq.post(admin.url("/healthz"), b"", persistent=False)
    await response.content()
    assert response.code == 405
    assert response.headers.getRawHeaders("allow") == ["GET, HEAD"]


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/"])
@pytest_twisted.ensureDeferred
async def test_token_required_everywhere(guarded_admin: Admin, path: str) -> None:
    """With a token configured, every path without it is 401 with a Bearer challenge."""
    code, headers, body = await guarded_admin.get(path)
    assert (code, body) == (401, "unauthorized\n")
    assert headers["www-authenticate"] == 'Bearer realm="mailgate admin"'
    assert TEST_ADMIN_TOKEN not in body


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer wrong-token",
        f"Basic {TEST_ADMIN_TOKEN}",
        f"Bearer {TEST_ADMIN_TOKEN}x",
        f"Bearer {TEST_ADMIN_TOKEN[:-1]}",
        "Bearer",
    ],
)
@pytest_twisted.ensureDeferred
async def test_wrong_token_refused(guarded_admin: Admin, authorization: str) -> None:
    """A wrong token, a prefix of the right one, or another scheme is refused."""
    code, _, _ = await guarded_admin.get("/metrics", headers={"Authorization": authorization})
    assert code == 401


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
@pytest_twisted.ensureDeferred
async def test_right_token_accepted(guarded_admin: Admin, scheme: str) -> None:
    """The right token opens every path; the scheme name is case-insensitive (RFC 9110 §11.1)."""
    headers = {"Authorization": f"{scheme} {TEST_ADMIN_TOKEN}"}
    assert (await guarded_admin.get("/healthz", headers=headers))[::2] == (200, "ok\n")
    assert (await guarded_admin.get("/metrics", headers=headers))[0] == 200


def test_directory_writable(tmp_path: Path) -> None:
    """A real write decides: an existing directory is writable; a missing one or a file is not."""
    assert directory_writable(tmp_path)
    assert list(tmp_path.iterdir()) == []  # The probe leaves nothing behind.
    assert not directory_writable(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    assert not directory_writable(tmp_path / "file")
