"""The ``http`` account store with a scripted transport and a Clock: answers, cache, coalescing."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailgate.accounts.account import Account
from mailgate.accounts.httpstore import HTTPAccountStore
from mailgate.config import ConfigError, parse_config
from mailgate.interfaces import AccountStoreUnavailable, IAccountStore, ITransport
from mailgate.providers.base import HTTPRequest, HTTPResponse
from mailgate.transports import APITimeout

URL = "https://auth.example.com/smtp-login"
# Throwaway test credentials, not secrets.
PASSWORD = "alice-test-password"
ACCOUNT = {
    "name": "alice",
    "route": ["main"],
    "allowed_senders": ["@alice.example"],
    "max_recipients": 5,
    "max_message_size": "2MiB",
    "defaults": {"x-mailgate-tag": "from-http", "X-Mailgate-Track-Opens": True},
    "providers": {"main": {"token": "alice-api-test-token"}},
}


@implementer(ITransport)
class ScriptedTransport:
    """Records requests; each answer is a Deferred the test fires (or an immediate value)."""

    def __init__(self) -> None:
        self.requests: list[HTTPRequest] = []
        self.pending: list[defer.Deferred[HTTPResponse]] = []

    def send(self, request: HTTPRequest) -> defer.Deferred[HTTPResponse]:
        self.requests.append(request)
        answer: defer.Deferred[HTTPResponse] = defer.Deferred()
        self.pending.append(answer)
        return answer

    def answer(self, status: int, body: Any = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
        self.pending.pop(0).callback(HTTPResponse(status, (("Content-Type", "application/json"),), data))

    def fail(self, error: Exception) -> None:
        self.pending.pop(0).errback(error)


def make_store(**options: Any) -> tuple[HTTPAccountStore, ScriptedTransport, Clock]:
    transport, clock = ScriptedTransport(), Clock()
    store = HTTPAccountStore(
        URL, transport, clock, providers={"main": ("token",), "backup": ("api_key",)}, **options
    )
    return store, transport, clock


def results(d: defer.Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_implements_the_interface_without_cram_md5() -> None:
    """The store is an IAccountStore that never offers CRAM-MD5."""
    store, _, _ = make_store()
    assert verifyObject(IAccountStore, store)
    assert store.supports_cram_md5 is False
    assert results(store.authenticate_cram_md5("alice", b"<1@x>", "00"))[0].check(UnauthorizedLogin)


def test_200_logs_in_with_the_account_from_the_json() -> None:
    """The endpoint gets the login as JSON; its account object becomes the Account."""
    store, transport, _ = make_store()
    got = results(store.authenticate_password("alice@example.com", PASSWORD))
    request = transport.requests[0]
    assert (request.method, request.url) == ("POST", URL)
    assert json.loads(request.body) == {"username": "alice@example.com", "password": PASSWORD}
    assert ("Content-Type", "application/json") in request.headers
    transport.answer(200, ACCOUNT)
    assert got == [
        Account(
            name="alice",
            route=("main",),
            provider_settings={"main": {"token": "alice-api-test-token"}},
            allowed_senders=("@alice.example",),
            max_recipients=5,
            max_message_size=2 * 1024 * 1024,
            defaults={"X-Mailgate-Tag": "from-http", "X-Mailgate-Track-Opens": "true"},
        )
    ]


def test_account_name_defaults_to_a_hash_of_the_username() -> None:
    """Without "name" the account is named after a hash, never the username (it may be a key)."""
    store, transport, _ = make_store()
    got = results(store.authenticate_password("api-key-1234", PASSWORD))
    transport.answer(200, {})
    assert got[0].name.startswith("http-") and "api-key" not in got[0].name
    assert got[0].route == ()


def test_mailgate_authenticates_to_the_endpoint() -> None:
    """A token goes out as Bearer, a username/password as HTTP Basic."""
    store, transport, _ = make_store(token="endpoint-test-token")
    store.authenticate_password("u", "p")
    assert ("Authorization", "Bearer endpoint-test-token") in transport.requests[0].headers
    store, transport, _ = make_store(basic_auth=("mailgate", "basic-test-password"))
    store.authenticate_password("u", "p")
    expected = "Basic " + base64.b64encode(b"mailgate:basic-test-password").decode()
    assert ("Authorization", expected) in transport.requests[0].headers


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_refuse_the_login(status: int) -> None:
    """401/403 mean wrong credentials: UnauthorizedLogin (535 5.7.8)."""
    store, transport, _ = make_store()
    got = results(store.authenticate_password("alice", "wrong"))
    transport.answer(status, {"error": "bad"})
    assert got[0].check(UnauthorizedLogin)


@pytest.mark.parametrize("status", [500, 502, 404, 302, 201])
def test_other_statuses_are_temporary(status: int) -> None:
    """Any other status is AccountStoreUnavailable (454 4.7.0) and is not cached."""
    store, transport, _ = make_store()
    got = results(store.authenticate_password("alice", PASSWORD))
    transport.answer(status, ACCOUNT)
    assert got[0].check(AccountStoreUnavailable)
    store.authenticate_password("alice", PASSWORD)
    assert len(transport.requests) == 2


@pytest.mark.parametrize(
    "error", [APITimeout("no answer within 10 s"), ConnectionRefusedError()], ids=["timeout", "refused"]
)
def test_unreachable_endpoint_is_temporary(error: Exception) -> None:
    """A timeout or connection failure is AccountStoreUnavailable, with no secret in its message."""
    store, transport, _ = make_store()
    got = results(store.authenticate_password("alice", PASSWORD))
    transport.fail(error)
    assert got[0].check(AccountStoreUnavailable)
    assert PASSWORD not in str(got[0].value)


BAD_ACCOUNTS = [
    (b"not json", "(body)"),
    ([1, 2], "(body)"),
    ({"name": "alice", "password": "x"}, "password"),
    ({"route": "main"}, "route"),
    ({"route": ["nowhere"]}, "route"),
    ({"providers": {"nowhere": {"token": "t"}}}, "providers.nowhere"),
    ({"providers": {"main": {"url": "https://evil.example"}}}, "providers.main.url"),
    ({"providers": {"main": {"token": "a\r\nX-Injected: 1"}}}, "providers.main.token"),
    ({"max_recipients": 0}, "max_recipients"),
    ({"max_message_size": "huge"}, "max_message_size"),
    ({"allowed_senders": ["not an address"]}, "allowed_senders"),
    ({"defaults": {"X-Not-A-Control": "1"}}, 'defaults."X-Not-A-Control"'),
    ({"delivery_mode": "carrier-pigeon"}, "delivery_mode"),
    ({"name": "two words"}, "name"),
]


@pytest.mark.parametrize(("body", "key"), BAD_ACCOUNTS)
def test_unusable_account_is_temporary_and_logged_by_field(body: Any, key: str, logged_errors: Any) -> None:
    """A 200 with a bad account object is 454 4.7.0, one logged error naming the field."""
    store, transport, _ = make_store()
    got = results(store.authenticate_password("alice", PASSWORD))
    transport.answer(200, body)
    assert got[0].check(AccountStoreUnavailable)
    errors = logged_errors.take()
    assert len(errors) == 1
    assert errors[0]["key"] == key
    assert "log_failure" not in errors[0]
    assert PASSWORD not in json.dumps({k: str(v) for k, v in errors[0].items()})


def test_secret_references_from_the_endpoint_are_taken_literally(tmp_path: Any) -> None:
    """An endpoint cannot make mailgate read its files or environment: env:/file: stay text."""
    secret_file = tmp_path / "secret"
    secret_file.write_text("server-side-secret")
    store, transport, _ = make_store()
    got = results(store.authenticate_password("alice", PASSWORD))
    transport.answer(200, {"providers": {"main": {"token": f"file:{secret_file}"}}})
    assert got[0].provider_settings["main"]["token"] == f"file:{secret_file}"


def test_success_is_cached_until_its_ttl_expires() -> None:
    """A repeated login is answered from the cache until success_ttl has passed."""
    store, transport, clock = make_store(success_ttl=300)
    store.authenticate_password("alice", PASSWORD)
    transport.answer(200, ACCOUNT)
    clock.advance(299)
    assert results(store.authenticate_password("alice", PASSWORD))[0].name == "alice"
    assert len(transport.requests) == 1
    clock.advance(1)
    got = results(store.authenticate_password("alice", PASSWORD))
    assert len(transport.requests) == 2 and got == []
    transport.answer(200, ACCOUNT)
    assert got[0].name == "alice"


def test_refusal_is_cached_for_the_failure_ttl() -> None:
    """A refused login is refused from the cache for failure_ttl, then asked again."""
    store, transport, clock = make_store(failure_ttl=30)
    results(store.authenticate_password("alice", "wrong"))
    transport.answer(401)
    clock.advance(29)
    assert results(store.authenticate_password("alice", "wrong"))[0].check(UnauthorizedLogin)
    assert len(transport.requests) == 1
    clock.advance(1)
    results(store.authenticate_password("alice", "wrong"))
    assert len(transport.requests) == 2


def test_a_different_password_is_not_served_from_the_cache() -> None:
    """The cache is keyed by username and password together."""
    store, transport, _ = make_store()
    store.authenticate_password("alice", PASSWORD)
    transport.answer(200, ACCOUNT)
    got = results(store.authenticate_password("alice", "other-password"))
    assert got == [] and len(transport.requests) == 2


def test_zero_ttl_disables_caching() -> None:
    """success_ttl = 0 asks the endpoint for every login."""
    store, transport, _ = make_store(success_ttl=0)
    store.authenticate_password("alice", PASSWORD)
    transport.answer(200, ACCOUNT)
    store.authenticate_password("alice", PASSWORD)
    assert len(transport.requests) == 2 and store.cached == 0


def test_concurrent_identical_logins_share_one_request() -> None:
    """Logins with the same credentials while a request is out wait for it, and all get its answer."""
    store, transport, _ = make_store()
    first = results(store.authenticate_password("alice", PASSWORD))
    second = results(store.authenticate_password("alice", PASSWORD))
    other = results(store.authenticate_password("bob", "bob-test-password"))
    assert len(transport.requests) == 2
    transport.answer(200, ACCOUNT)
    assert first[0].name == second[0].name == "alice" and other == []
    transport.answer(401)
    assert other[0].check(UnauthorizedLogin)


def test_coalesced_logins_all_see_a_failure() -> None:
    """Every waiter of a shared request gets the temporary failure, as its own error."""
    store, transport, _ = make_store()
    waiting = [results(store.authenticate_password("alice", PASSWORD)) for _ in range(3)]
    transport.answer(503)
    assert all(w[0].check(AccountStoreUnavailable) for w in waiting)
    assert len({id(w[0].value) for w in waiting}) == 3


def test_cache_is_bounded_least_recently_used_first() -> None:
    """At most cache_size answers are kept; the least recently used goes first."""
    store, transport, _ = make_store(cache_size=2)
    for user in ("a", "b"):
        store.authenticate_password(user, PASSWORD)
        transport.answer(200, {})
    store.authenticate_password("a", PASSWORD)  # a is now the most recent
    store.authenticate_password("c", PASSWORD)
    transport.answer(200, {})
    assert store.cached == 2
    asked = len(transport.requests)
    store.authenticate_password("a", PASSWORD)
    assert len(transport.requests) == asked
    store.authenticate_password("b", PASSWORD)
    assert len(transport.requests) == asked + 1


def test_the_password_is_not_kept_in_clear() -> None:
    """Neither the cache keys nor the store's repr hold the password."""
    store, transport, _ = make_store()
    store.authenticate_password("alice", PASSWORD)
    transport.answer(200, ACCOUNT)
    assert all(PASSWORD.encode() not in key for key in store._cache)
    assert PASSWORD not in repr(store)
    assert PASSWORD not in repr(transport.requests[0])


# -- [accounts] keys of the http store ----------------------------------------------


def http_config(tmp_path: Any, **accounts: Any) -> Any:
    """parse_config with an http store; a key given as None is left out."""
    table = {key: value for key, value in {"store": "http", "url": URL, **accounts}.items() if value is not None}
    data = {
        "listeners": [{"endpoint": "tcp:587", "role": "submission"}],
        "accounts": table,
        "providers": {"main": {"type": "webhook", "url": "https://api.example.com/v1", "token": "t"}},
    }
    return parse_config(data, base_dir=tmp_path)


def test_http_store_config_defaults_and_secrets(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults: 10 s timeout, 300 s / 60 s TTLs, 10000 entries; token from env:, ca_file relative
    to the config; secrets stay out of the repr."""
    monkeypatch.setenv("AUTH_ENDPOINT_TOKEN", "endpoint-test-token")
    accounts = http_config(tmp_path, token="env:AUTH_ENDPOINT_TOKEN", ca_file="ca.pem").accounts
    assert (accounts.url, accounts.token, accounts.ca_file) == (URL, "endpoint-test-token", tmp_path / "ca.pem")
    assert (accounts.timeout, accounts.success_ttl, accounts.failure_ttl, accounts.cache_size) == (10.0, 300.0, 60.0, 10_000)
    assert "endpoint-test-token" not in repr(accounts)
    basic = http_config(tmp_path, username="mailgate", password="basic-test-password", success_ttl=0).accounts
    assert (basic.username, basic.password, basic.success_ttl) == ("mailgate", "basic-test-password", 0.0)
    assert "basic-test-password" not in repr(basic)


def test_plain_http_only_to_loopback(tmp_path: Any) -> None:
    """http:// is accepted for a loopback endpoint only: passwords never cross a network in clear."""
    assert http_config(tmp_path, url="http://127.0.0.1:8080/auth").accounts.url == "http://127.0.0.1:8080/auth"
    with pytest.raises(ConfigError, match="accounts.url: must be an https:// URL"):
        http_config(tmp_path, url="http://auth.example.com/login")


@pytest.mark.parametrize(
    ("accounts", "key"),
    [
        ({"url": None}, "accounts.url"),
        ({"timeout": 0}, "accounts.timeout"),
        ({"success_ttl": -1}, "accounts.success_ttl"),
        ({"failure_ttl": float("inf")}, "accounts.failure_ttl"),
        ({"cache_size": 0}, "accounts.cache_size"),
        ({"username": "u"}, "accounts.password"),
        ({"token": "t", "username": "u", "password": "p"}, "accounts.token"),
        ({"tiemout": 5}, "accounts.tiemout"),
    ],
)
def test_http_store_config_errors_name_the_key(tmp_path: Any, accounts: dict[str, Any], key: str) -> None:
    """Wrong or unknown [accounts] keys stop start-up naming the key."""
    with pytest.raises(ConfigError) as caught:
        http_config(tmp_path, **accounts)
    assert caught.value.key == key


def test_http_keys_need_the_http_store(tmp_path: Any) -> None:
    """url and friends with another store are an error, not silently ignored."""
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "listeners": [{"endpoint": "tcp:587", "role": "submission"}],
                "accounts": {"store": "file", "path": "a.toml", "url": URL},
                "providers": {"main": {"type": "webhook", "url": "https://a.example/v1"}},
            },
            base_dir=tmp_path,
        )
    assert (caught.value.key, caught.value.message) == ("accounts.url", 'only used with store = "http"')


def test_example_configuration_keys_are_valid(tmp_path: Any) -> None:
    """The commented http-store keys in etc/mailgate.toml.example parse as an [accounts] table."""
    import re
    import tomllib
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "etc" / "mailgate.toml.example").read_text()
    start = text.index('#   url = "https://')
    lines = []
    for line in text[start:].splitlines():
        if not line.startswith("#   "):
            break
        lines.append(re.sub(r"\s+#.*$", "", line.removeprefix("#   ")))
    example = tomllib.loads("\n".join(lines))
    assert set(example) == {"url", "token", "username", "password", "ca_file", "timeout", "success_ttl", "failure_ttl", "cache_size"}
    del example["username"], example["password"]  # the alternative to token
    example["token"] = "inline-test-token"
    accounts = http_config(tmp_path, **example).accounts
    assert accounts.url == "https://auth.internal.example/smtp-login"
