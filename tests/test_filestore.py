"""Tests for mailgate.accounts.filestore: loading, validation and logins."""

from __future__ import annotations

import hmac
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from mailgate import passwords
from mailgate.accounts.account import Account
from mailgate.accounts.filestore import FileAccountStore, load_accounts
from mailgate.configvalues import ConfigError
from mailgate.interfaces import IAccountStore

EXAMPLE = Path(__file__).parent.parent / "etc" / "accounts.toml.example"
CHALLENGE = b"<12345.67890@mail.example.com>"


class SyncRunner:
    """A run_in_thread that runs the function at once and counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, f: Callable[[], Any]) -> defer.Deferred[Any]:
        self.calls += 1
        return defer.maybeDeferred(f)


def result_of(d: defer.Deferred[Any]) -> Any:
    """The result (or Failure) a Deferred already has."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    return results[0]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "accounts.toml"
    path.write_text(textwrap.dedent(text))
    return path


def store_with(tmp_path: Path, text: str, **kwargs: Any) -> tuple[FileAccountStore, SyncRunner]:
    runner = SyncRunner()
    return FileAccountStore(write(tmp_path, text), run_in_thread=runner, **kwargs), runner


def users(tmp_path: Path) -> tuple[FileAccountStore, SyncRunner]:
    """A store with a password+CRAM-MD5 account, a password-only account and an API key."""
    return store_with(
        tmp_path,
        f"""
        [accounts.alice]
        password = "{passwords.hash_password('alice-pw')}"
        cram_md5 = "{passwords.cram_md5_state('alice-pw')}"
        route = ["main", "backup"]

        [accounts."bob@example.com"]
        password = "{passwords.hash_password('bob-pw')}"

        [accounts.app]
        password = "{passwords.hash_api_key('mg_key')}"
        """,
    )


def test_store_provides_interface(tmp_path: Path) -> None:
    """FileAccountStore implements IAccountStore."""
    store, _ = users(tmp_path)
    assert verifyObject(IAccountStore, store)


def test_example_file_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """etc/accounts.toml.example is valid and every key lands in the Account."""
    monkeypatch.setenv("ALICE_POSTMARK_TOKEN", "pm-token")
    text = EXAMPLE.read_text()
    with pytest.raises(ConfigError):
        load_accounts(EXAMPLE)  # Its placeholders are refused: never deployable as is.
    text = text.replace('"REPLACE-WITH: mailgate account passwd alice"', f'"{passwords.hash_password("x")}"')
    text = text.replace('"REPLACE-WITH: mailgate account passwd alice --cram-md5"', f'"{passwords.cram_md5_state("x")}"')
    text = text.replace('"REPLACE-WITH: mailgate account passwd app1 --generate-key"', f'"{passwords.hash_api_key("k")}"')
    filled = tmp_path / "accounts.toml"
    filled.write_text(text)
    entries = load_accounts(filled)
    assert sorted(entries) == ["alice", "app1"]
    alice = entries["alice"].account
    assert alice == Account(
        name="alice",
        route=("main",),
        provider_settings={"main": {"token": "pm-token"}},
        allowed_senders=("alice@example.com", "@example.org"),
        max_recipients=50,
        max_message_size=10 * 1024 * 1024,
        defaults={"X-Mailgate-Track-Opens": "true", "X-Mailgate-Stream": "outbound"},
        delivery_mode="sync",
        max_messages_per_minute=120,
        message_burst=20,
    )
    assert entries["alice"].cram_md5 is not None
    assert entries["app1"].account == Account(name="app1")


def test_password_login(tmp_path: Path) -> None:
    """The right password yields the Account, checked off the reactor thread."""
    store, runner = users(tmp_path)
    account = result_of(store.authenticate_password("alice", "alice-pw"))
    assert account.name == "alice" and account.route == ("main", "backup")
    assert result_of(store.authenticate_password("bob@example.com", "bob-pw")).name == (
        "bob@example.com"
    )
    assert runner.calls == 2


def test_wrong_password_is_unauthorized(tmp_path: Path) -> None:
    """A wrong password fails with UnauthorizedLogin that does not contain it."""
    store, _ = users(tmp_path)
    failure = result_of(store.authenticate_password("alice", "guess-123"))
    assert isinstance(failure, Failure) and failure.check(UnauthorizedLogin)
    assert "guess-123" not in str(failure.value)


def test_unknown_user_costs_a_scrypt_check(tmp_path: Path) -> None:
    """An unknown user is refused after a decoy scrypt check, like a known one."""
    store, runner = users(tmp_path)
    failure = result_of(store.authenticate_password("mallory", "alice-pw"))
    assert failure.check(UnauthorizedLogin)
    assert runner.calls == 1


def test_api_key_login_needs_no_thread(tmp_path: Path) -> None:
    """A sha256 API key is checked at once, without a thread."""
    store, runner = users(tmp_path)
    assert result_of(store.authenticate_password("app", "mg_key")).name == "app"
    assert result_of(store.authenticate_password("app", "mg_other")).check(UnauthorizedLogin)
    assert runner.calls == 0


def test_api_key_only_file_uses_a_fast_decoy(tmp_path: Path) -> None:
    """With only API keys, an unknown user is refused as fast as a known one."""
    store, runner = store_with(
        tmp_path, f'[accounts.app]\npassword = "{passwords.hash_api_key("k")}"\n'
    )
    assert result_of(store.authenticate_password("nobody", "k")).check(UnauthorizedLogin)
    assert runner.calls == 0


def test_default_runner_uses_the_reactor_thread_pool(tmp_path: Path) -> None:
    """Without run_in_thread, scrypt goes to the given reactor's thread pool."""

    class FakePool:
        calls = 0

        def callInThreadWithCallback(self, on_result: Callable, f: Callable, *a: Any) -> None:
            FakePool.calls += 1
            on_result(True, f(*a))

    class FakeReactor:
        pool = FakePool()

        def getThreadPool(self) -> FakePool:
            return self.pool

        def callFromThread(self, f: Callable, *a: Any) -> None:
            f(*a)

    path = write(tmp_path, f'[accounts.a]\npassword = "{passwords.hash_password("pw")}"\n')
    store = FileAccountStore(path, reactor=FakeReactor())
    assert result_of(store.authenticate_password("a", "pw")).name == "a"
    assert FakePool.calls == 1


def test_concurrent_hashes_are_bounded(tmp_path: Path) -> None:
    """No more than max_concurrent_hashes scrypt checks are in a thread at once."""
    pending: list[tuple[defer.Deferred[Any], Callable[[], Any]]] = []

    def runner(f: Callable[[], Any]) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        pending.append((d, f))
        return d

    path = write(tmp_path, f'[accounts.a]\npassword = "{passwords.hash_password("pw")}"\n')
    store = FileAccountStore(path, run_in_thread=runner, max_concurrent_hashes=1)
    first = store.authenticate_password("a", "pw")
    second = store.authenticate_password("a", "nope")
    assert len(pending) == 1
    d, f = pending.pop()
    d.callback(f())
    assert result_of(first).name == "a"
    assert len(pending) == 1
    d, f = pending.pop()
    d.callback(f())
    assert result_of(second).check(UnauthorizedLogin)


def test_cram_md5_login(tmp_path: Path) -> None:
    """CRAM-MD5 works for accounts with a state and only with the right digest."""
    store, _ = users(tmp_path)
    digest = hmac.new(b"alice-pw", CHALLENGE, "md5").hexdigest()
    assert store.supports_cram_md5
    assert result_of(store.authenticate_cram_md5("alice", CHALLENGE, digest)).name == "alice"
    assert result_of(store.authenticate_cram_md5("alice", CHALLENGE, "0" * 32)).check(
        UnauthorizedLogin
    )


def test_cram_md5_refused_without_state(tmp_path: Path) -> None:
    """Accounts without a CRAM-MD5 state, and unknown users, are refused."""
    store, _ = users(tmp_path)
    digest = hmac.new(b"bob-pw", CHALLENGE, "md5").hexdigest()
    assert result_of(store.authenticate_cram_md5("bob@example.com", CHALLENGE, digest)).check(
        UnauthorizedLogin
    )
    assert result_of(store.authenticate_cram_md5("nobody", CHALLENGE, digest)).check(
        UnauthorizedLogin
    )


def test_supports_cram_md5_false_without_states(tmp_path: Path) -> None:
    """supports_cram_md5 is False when no account has a CRAM-MD5 state."""
    store, _ = store_with(tmp_path, f'[accounts.a]\npassword = "{passwords.hash_api_key("k")}"\n')
    assert store.supports_cram_md5 is False


def test_listing(tmp_path: Path) -> None:
    """accounts() lists every Account by name; get() finds one or returns None."""
    store, _ = users(tmp_path)
    assert [a.name for a in store.accounts()] == ["alice", "app", "bob@example.com"]
    assert store.get("app") == Account(name="app")
    assert store.get("nobody") is None


def test_reload_picks_up_changes(tmp_path: Path) -> None:
    """reload() re-reads the file."""
    store, _ = users(tmp_path)
    store.path.write_text(f'[accounts.carol]\npassword = "{passwords.hash_password("c")}"\n')
    store.reload()
    assert [a.name for a in store.accounts()] == ["carol"]
    assert result_of(store.authenticate_password("alice", "alice-pw")).check(UnauthorizedLogin)


def test_failed_reload_keeps_old_accounts(tmp_path: Path) -> None:
    """A reload that fails raises ConfigError and leaves the old accounts working."""
    store, _ = users(tmp_path)
    store.path.write_text('[accounts.alice]\npassword = "alice-pw"\n')
    with pytest.raises(ConfigError):
        store.reload()
    assert result_of(store.authenticate_password("alice", "alice-pw")).name == "alice"


def test_provider_settings_resolved_at_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """env: and file: provider settings are resolved; relative files from the file's directory."""
    monkeypatch.setenv("MG_TEST_TOKEN", "env-token")
    (tmp_path / "key.txt").write_text("file-key\n")
    store, _ = store_with(
        tmp_path,
        f"""
        [accounts.a]
        password = "{passwords.hash_api_key('k')}"
        [accounts.a.providers.main]
        token = "env:MG_TEST_TOKEN"
        key = "file:key.txt"
        inline = "literal"
        """,
    )
    account = store.get("a")
    assert account is not None
    assert account.provider_settings == {
        "main": {"token": "env-token", "key": "file-key", "inline": "literal"}
    }
    assert "env-token" not in repr(account) and "file-key" not in repr(account)


def test_entry_repr_hides_hashes(tmp_path: Path) -> None:
    """Loaded entries do not show their hashes in repr."""
    entries = load_accounts(write(tmp_path, f'[accounts.a]\npassword = "{passwords.hash_api_key("k")}"\n'))
    assert "sha256$" not in repr(entries["a"])


def test_defaults_are_canonicalised(tmp_path: Path) -> None:
    """Control header defaults are matched without case and stored canonically; booleans become strings."""
    store, _ = store_with(
        tmp_path,
        f"""
        [accounts.a]
        password = "{passwords.hash_api_key('k')}"
        [accounts.a.defaults]
        "x-mailgate-inline-css" = true
        "X-MAILGATE-METADATA-customer" = "42"
        """,
    )
    account = store.get("a")
    assert account is not None
    assert dict(account.defaults) == {
        "X-Mailgate-Inline-CSS": "true",
        "X-Mailgate-Metadata-customer": "42",
    }


PW = passwords.hash_api_key("k")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('[accounts.a]\npassword = "hunter2"\n', "accounts.a.password: must be a scrypt$ or sha256$ hash; clear-text passwords are refused (set it with `mailgate account passwd`)"),
        ("[accounts.a]\nroute = []\n", "accounts.a.password: missing"),
        (f'[accounts.a]\npassword = "{PW}"\ncolour = "red"\n', "accounts.a.colour: unknown key"),
        (f'[accounts.a]\npassword = "{PW}"\ncram_md5 = "secret"\n', "accounts.a.cram_md5: must be"),
        (f'[accounts.a]\npassword = "{PW}"\nroute = "main"\n', "accounts.a.route: must be a list"),
        (f'[accounts.a]\npassword = "{PW}"\nroute = ["a", "a"]\n', "accounts.a.route: names a provider twice"),
        (f'[accounts.a]\npassword = "{PW}"\nroute = ["a,b"]\n', "accounts.a.route: must be a list"),
        (f'[accounts.a]\npassword = "{PW}"\nallowed_senders = ["alice"]\n', "accounts.a.allowed_senders: must be a list"),
        (f'[accounts.a]\npassword = "{PW}"\nmax_recipients = 0\n', "accounts.a.max_recipients: must be a positive integer"),
        (f'[accounts.a]\npassword = "{PW}"\nmax_recipients = true\n', "accounts.a.max_recipients: must be a positive integer"),
        (f'[accounts.a]\npassword = "{PW}"\nmax_recipients = "5"\n', "accounts.a.max_recipients: must be a positive integer"),
        (f'[accounts.a]\npassword = "{PW}"\nmax_messages_per_minute = -1\n', "accounts.a.max_messages_per_minute: must be an integer, 0 or more"),
        (f'[accounts.a]\npassword = "{PW}"\nmax_messages_per_minute = 1.5\n', "accounts.a.max_messages_per_minute: must be an integer, 0 or more"),
        (f'[accounts.a]\npassword = "{PW}"\nmessage_burst = 0\n', "accounts.a.message_burst: must be a positive integer"),
        (f'[accounts.a]\npassword = "{PW}"\nmax_message_size = "10 parsecs"\n', "accounts.a.max_message_size: must be a positive number"),
        (f'[accounts.a]\npassword = "{PW}"\ndelivery_mode = "later"\n', 'accounts.a.delivery_mode: must be "sync" or "queue"'),
        (f'[accounts.a]\npassword = "{PW}"\n[accounts.a.defaults]\n"X-Mailgate-Track-Open" = "true"\n', 'accounts.a.defaults."X-Mailgate-Track-Open": not a control header'),
        (f'[accounts.a]\npassword = "{PW}"\n[accounts.a.defaults]\n"X-Mailgate-Tag" = 3\n', 'accounts.a.defaults."X-Mailgate-Tag": must be a string'),
        (f'[accounts.a]\npassword = "{PW}"\ndefaults = "x"\n', "accounts.a.defaults: must be a table"),
        (f'[accounts.a]\npassword = "{PW}"\n[accounts.a.providers.main]\ntoken = 5\n', "accounts.a.providers.main.token: must be a string"),
        (f'[accounts.a]\npassword = "{PW}"\n[accounts.a.providers.main]\ntoken = "env:MG_TEST_UNSET_VAR"\n', "accounts.a.providers.main.token: environment variable MG_TEST_UNSET_VAR is not set"),
        (f'[accounts.a]\npassword = "{PW}"\nproviders = "main"\n', "accounts.a.providers: must be a table"),
        (f'[accounts."a b"]\npassword = "{PW}"\n', 'accounts."a b": account names must be'),
        ("accounts = 3\n", "accounts: must be a table"),
        ("[server]\nhostname = 'x'\n", "server: unknown key"),
        ("[accounts.a\n", "not valid TOML"),
    ],
)
def test_invalid_files_name_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, expected: str
) -> None:
    """Every invalid value raises ConfigError naming the file and the key."""
    monkeypatch.delenv("MG_TEST_UNSET_VAR", raising=False)
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        FileAccountStore(path, run_in_thread=SyncRunner())
    assert str(info.value).startswith(f"{path}: {expected}")
    assert "hunter2" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    """A missing accounts file raises ConfigError naming it."""
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        FileAccountStore(path)
    assert str(info.value).startswith(f"{path}: cannot read accounts file")


def test_empty_file_has_no_accounts(tmp_path: Path) -> None:
    """An empty file is valid and refuses every login."""
    store, _ = store_with(tmp_path, "")
    assert store.accounts() == ()
    assert result_of(store.authenticate_password("a", "b")).check(UnauthorizedLogin)


def test_accounts_file_that_is_not_utf8(tmp_path: Path) -> None:
    """A Latin-1 accounts file is a one-line ConfigError naming it, not a traceback."""
    path = tmp_path / "accounts.toml"
    path.write_bytes('# comptes à vérifier\n[accounts.a]\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        FileAccountStore(path)
    assert str(info.value) == f"{path}: not valid TOML: the file is not UTF-8"
