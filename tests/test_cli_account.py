"""Tests for `mailgate account` (mailgate.cli), run in-process."""

from __future__ import annotations

import hmac
import io
import stat
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer

from mailgate import cli, passwords
from mailgate.accounts.filestore import FileAccountStore

CHALLENGE = b"<4242.1@mail.example.com>"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A main configuration whose file store lives next to it."""
    path = tmp_path / "mailgate.toml"
    path.write_text('[accounts]\nstore = "file"\npath = "accounts.toml"\n')
    return path


def accounts_file(config: Path) -> Path:
    return config.parent / "accounts.toml"


def read(config: Path) -> dict[str, Any]:
    return tomllib.loads(accounts_file(config).read_text())["accounts"]


def store(config: Path) -> FileAccountStore:
    return FileAccountStore(accounts_file(config), run_in_thread=defer.maybeDeferred)


def result_of(d: defer.Deferred[Any]) -> Any:
    """The result (or Failure) a Deferred already has."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    return results[0]


def run(*argv: str) -> int:
    return cli.main(list(argv))


def assert_one_line_error(capsys: pytest.CaptureFixture[str], fragment: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("mailgate: error: ") and err.count("\n") == 1
    assert fragment in err
    assert "Traceback" not in err
    return err


def test_add_with_password_stores_scrypt(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """add --password stores a scrypt hash in a 0600 file and prints nothing."""
    assert run("account", "add", "--config", str(config), "alice", "--password", "hunter2!") == 0
    entry = read(config)["alice"]
    assert passwords.hash_scheme(entry["password"]) == "scrypt"
    assert "cram_md5" not in entry
    assert stat.S_IMODE(accounts_file(config).stat().st_mode) == 0o600
    assert "hunter2!" not in accounts_file(config).read_text()
    assert capsys.readouterr().out == ""
    assert result_of(store(config).authenticate_password("alice", "hunter2!")).name == "alice"


def test_add_reads_password_from_stdin(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --password and without a terminal, one line of stdin is the password."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin\nignored\n"))
    assert run("account", "add", "--config", str(config), "alice") == 0
    assert result_of(store(config).authenticate_password("alice", "from stdin")).name == "alice"


def test_add_prompts_twice_on_a_terminal(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal the password is asked twice with getpass."""
    answers = iter(["typed pw", "typed pw"])
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt: next(answers))
    assert run("account", "add", "--config", str(config), "alice") == 0
    assert result_of(store(config).authenticate_password("alice", "typed pw")).name == "alice"


def test_add_prompt_mismatch_fails(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two different answers at the prompt abort without writing and without echoing them."""
    answers = iter(["first-try", "second-try"])
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt: next(answers))
    assert run("account", "add", "--config", str(config), "alice") == 2
    err = assert_one_line_error(capsys, "do not match")
    assert "first-try" not in err and "second-try" not in err
    assert not accounts_file(config).exists()


def test_add_empty_stdin_fails(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No password on stdin, or an empty one, is an error."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert run("account", "add", "--config", str(config), "alice") == 2
    assert_one_line_error(capsys, "no password on standard input")
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert run("account", "add", "--config", str(config), "alice") == 2
    assert_one_line_error(capsys, "the password is empty")


def test_add_generate_key(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--generate-key prints a new mg_ key once and stores only its SHA-256."""
    assert run("account", "add", "--config", str(config), "app", "--generate-key") == 0
    out = capsys.readouterr().out
    key = out.strip()
    assert key.startswith("mg_") and out.count("\n") == 1
    assert read(config)["app"]["password"] == passwords.hash_api_key(key)
    assert result_of(store(config).authenticate_password("app", key)).name == "app"


def test_add_with_cram_md5(config: Path) -> None:
    """--cram-md5 stores the state, and the store then accepts PLAIN and CRAM-MD5."""
    assert run("account", "add", "--config", str(config), "alice", "--password", "pw-1", "--cram-md5") == 0
    entry = read(config)["alice"]
    assert entry["cram_md5"] == passwords.cram_md5_state("pw-1")
    accounts = store(config)
    digest = hmac.new(b"pw-1", CHALLENGE, "md5").hexdigest()
    assert result_of(accounts.authenticate_password("alice", "pw-1")).name == "alice"
    assert result_of(accounts.authenticate_cram_md5("alice", CHALLENGE, digest)).name == "alice"


def test_add_generated_key_with_cram_md5(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A generated key may also get a CRAM-MD5 state, computed from the key."""
    assert run("account", "add", "--config", str(config), "app", "--generate-key", "--cram-md5") == 0
    key = capsys.readouterr().out.strip()
    digest = hmac.new(key.encode(), CHALLENGE, "md5").hexdigest()
    assert result_of(store(config).authenticate_cram_md5("app", CHALLENGE, digest)).name == "app"


def test_add_route_and_senders(config: Path) -> None:
    """--route and repeated --allow-sender are written as lists and reach the Account."""
    assert run(
        "account", "add", "--config", str(config), "alice", "--password", "pw",
        "--route", "main, backup", "--allow-sender", "alice@example.com", "--allow-sender", "@example.org",
    ) == 0
    entry = read(config)["alice"]
    assert entry["route"] == ["main", "backup"]
    assert entry["allowed_senders"] == ["alice@example.com", "@example.org"]
    account = store(config).get("alice")
    assert account is not None and account.route == ("main", "backup")


def test_add_invalid_sender_fails_before_prompting(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad --allow-sender is refused before any password is asked for."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert run("account", "add", "--config", str(config), "alice", "--allow-sender", "nobody") == 2
    assert_one_line_error(capsys, "allowed_senders")
    assert not accounts_file(config).exists()


def test_add_duplicate_fails(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Adding an existing user fails with exit 2 and does not echo the secret."""
    assert run("account", "add", "--config", str(config), "alice", "--password", "pw-one") == 0
    before = accounts_file(config).read_text()
    assert run("account", "add", "--config", str(config), "alice", "--password", "pw-two") == 2
    err = assert_one_line_error(capsys, "account 'alice' already exists")
    assert "pw-two" not in err
    assert accounts_file(config).read_text() == before


def test_add_keeps_other_accounts_intact(config: Path) -> None:
    """Rewriting the file keeps every other account and all of its keys."""
    other = {
        "password": passwords.hash_api_key("k"),
        "route": ["main"],
        "max_message_size": "10MiB",
        "defaults": {"X-Mailgate-Track-Opens": "true"},
        "providers": {"main": {"token": "env:SOME_TOKEN"}},
    }
    accounts_file(config).write_text(
        '[accounts."bob@example.com"]\n'
        f'password = "{other["password"]}"\n'
        'route = ["main"]\nmax_message_size = "10MiB"\n'
        '[accounts."bob@example.com".defaults]\n"X-Mailgate-Track-Opens" = "true"\n'
        '[accounts."bob@example.com".providers.main]\ntoken = "env:SOME_TOKEN"\n'
    )
    assert run("account", "add", "--config", str(config), "alice", "--password", "pw") == 0
    assert read(config)["bob@example.com"] == other
    assert sorted(p.name for p in config.parent.iterdir()) == ["accounts.toml", "mailgate.toml"]


def test_passwd_replaces_the_secret(config: Path) -> None:
    """passwd replaces the password: the old one stops working, the new one works."""
    run("account", "add", "--config", str(config), "alice", "--password", "old-pw", "--route", "main")
    assert run("account", "passwd", "--config", str(config), "alice", "--password", "new-pw") == 0
    accounts = store(config)
    assert result_of(accounts.authenticate_password("alice", "new-pw")).name == "alice"
    assert result_of(accounts.authenticate_password("alice", "old-pw")).check(UnauthorizedLogin)
    assert read(config)["alice"]["route"] == ["main"]


def test_passwd_keeps_recomputes_or_drops_cram_md5(config: Path) -> None:
    """passwd keeps CRAM-MD5 (recomputed) by default, --no-cram-md5 drops it, --cram-md5 adds it."""
    run("account", "add", "--config", str(config), "alice", "--password", "pw-1", "--cram-md5")
    assert run("account", "passwd", "--config", str(config), "alice", "--password", "pw-2") == 0
    assert read(config)["alice"]["cram_md5"] == passwords.cram_md5_state("pw-2")
    assert run("account", "passwd", "--config", str(config), "alice", "--password", "pw-3", "--no-cram-md5") == 0
    assert "cram_md5" not in read(config)["alice"]
    assert run("account", "passwd", "--config", str(config), "alice", "--password", "pw-4", "--cram-md5") == 0
    assert read(config)["alice"]["cram_md5"] == passwords.cram_md5_state("pw-4")


def test_passwd_generate_key(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """passwd --generate-key turns a password account into an API-key account."""
    run("account", "add", "--config", str(config), "alice", "--password", "pw")
    assert run("account", "passwd", "--config", str(config), "alice", "--generate-key") == 0
    key = capsys.readouterr().out.strip()
    assert read(config)["alice"]["password"] == passwords.hash_api_key(key)


def test_passwd_unknown_user_fails(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """passwd for a user that does not exist is an error."""
    run("account", "add", "--config", str(config), "alice", "--password", "pw")
    assert run("account", "passwd", "--config", str(config), "bob", "--password", "secret-x") == 2
    err = assert_one_line_error(capsys, "no account 'bob'")
    assert "secret-x" not in err


def test_remove(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """remove deletes one account; removing an unknown user is an error."""
    run("account", "add", "--config", str(config), "alice", "--password", "pw")
    run("account", "add", "--config", str(config), "bob", "--password", "pw")
    assert run("account", "remove", "--config", str(config), "alice") == 0
    assert list(read(config)) == ["bob"]
    assert run("account", "remove", "--config", str(config), "alice") == 2
    assert_one_line_error(capsys, "no account 'alice'")


def test_list_shows_no_hashes(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """list shows names, schemes, routes and senders, never hashes."""
    run("account", "add", "--config", str(config), "alice", "--password", "pw", "--cram-md5",
        "--route", "main,backup", "--allow-sender", "@example.org")
    run("account", "add", "--config", str(config), "app", "--generate-key")
    capsys.readouterr()
    assert run("account", "list", "--config", str(config)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "AUTH", "ROUTE", "ALLOWED", "SENDERS"]
    assert lines[1].split() == ["alice", "scrypt,cram-md5", "main,backup", "@example.org"]
    assert lines[2].split() == ["app", "sha256", "(default)", "(any)"]
    assert "$" not in "\n".join(lines)


def test_list_missing_file_fails(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Listing a file store whose file does not exist yet is an error."""
    assert run("account", "list", "--config", str(config)) == 2
    assert_one_line_error(capsys, "does not exist")


def test_relative_path_is_from_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """accounts.path is resolved against the configuration file's directory, not the cwd."""
    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "mailgate.toml"
    config.write_text('[accounts]\nstore = "file"\npath = "accounts.toml"\n')
    monkeypatch.chdir(tmp_path)
    assert run("account", "add", "--config", "etc/mailgate.toml", "alice", "--password", "pw") == 0
    assert (tmp_path / "etc" / "accounts.toml").exists()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[accounts]\nstore = "passthrough"\n', "accounts.store is 'passthrough'"),
        ('[server]\nhostname = "x"\n', "no [accounts] table"),
        ('[accounts]\nstore = "file"\n', "accounts.path must name the accounts file"),
        ("[accounts\n", "not valid TOML"),
    ],
)
def test_config_problems_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, fragment: str
) -> None:
    """A configuration without a file store is a one-line error."""
    config = tmp_path / "mailgate.toml"
    config.write_text(text)
    assert run("account", "list", "--config", str(config)) == 2
    assert_one_line_error(capsys, fragment)


def test_missing_config_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A configuration file that cannot be read is a one-line error."""
    assert run("account", "list", "--config", str(tmp_path / "absent.toml")) == 2
    assert_one_line_error(capsys, "cannot read")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["account", "frobnicate"], "invalid choice: 'frobnicate'"),
        (["nonsense"], "invalid choice: 'nonsense'"),
        ([], "required"),
        (["account", "add", "alice", "--password", "pw"], "--config"),
        (["account", "add", "--config", "x", "a", "--password", "p", "--generate-key"], "not allowed with"),
    ],
)
def test_usage_errors(argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Usage errors exit 2 with one "mailgate: error:" line."""
    assert cli.main(argv) == 2
    assert_one_line_error(capsys, fragment)


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """--help prints usage and returns 0."""
    assert cli.main(["account", "add", "--help"]) == 0
    assert "--generate-key" in capsys.readouterr().out


def test_write_failure_is_an_error(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unwritable accounts directory is a one-line error, not a traceback."""
    config.write_text('[accounts]\nstore = "file"\npath = "missing-dir/accounts.toml"\n')
    assert run("account", "add", "--config", str(config), "alice", "--password", "pw") == 2
    assert_one_line_error(capsys, "cannot write")
