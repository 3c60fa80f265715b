"""Start-up checks in build.py that stop a dangerous or broken configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mailgate.accounts.account import Account
from mailgate.build import check_accounts, check_passthrough
from mailgate.config import ConfigError, parse_config


def passthrough_config(tmp_path: Path, **provider: object) -> object:
    return parse_config(
        {
            "listeners": [{"endpoint": "tcp:587", "role": "submission"}],
            "accounts": {"store": "passthrough", "provider": "main", "password_settings": ["token"]},
            "providers": {"main": {"type": "webhook", "url": "https://api.example.com/v1", **provider}},
        },
        base_dir=tmp_path,
    )


def test_passthrough_refuses_operator_credentials(tmp_path: Path) -> None:
    """With passthrough logins, a token in the provider's settings would let any login
    send with the operator's key: start-up refuses it, naming the key."""
    with pytest.raises(ConfigError, match=r"providers\.main\.token: must not be set"):
        check_passthrough(passthrough_config(tmp_path, token="operator-token"))
    with pytest.raises(ConfigError, match=r"providers\.main\.username: must not be set"):
        check_passthrough(passthrough_config(tmp_path, username="op", password="pw"))
    check_passthrough(passthrough_config(tmp_path, signing_secret="fine"))


def test_passthrough_settings_must_be_credentials(tmp_path: Path) -> None:
    """The login may only fill credential settings (not, say, the URL)."""
    config = parse_config(
        {
            "listeners": [{"endpoint": "tcp:587", "role": "submission"}],
            "accounts": {"store": "passthrough", "provider": "main", "password_settings": ["url"]},
            "providers": {"main": {"type": "webhook", "url": "https://api.example.com/v1"}},
        },
        base_dir=tmp_path,
    )
    with pytest.raises(ConfigError, match=r"accounts\.password_settings\[0\]: must be one of token"):
        check_passthrough(config)


class Listing:
    def __init__(self, *accounts: Account):
        self._accounts = accounts

    def accounts(self) -> tuple[Account, ...]:
        return self._accounts


def file_config(tmp_path: Path, **sections: Any) -> Any:
    return parse_config(
        {
            "listeners": [{"endpoint": "tcp:587", "role": "submission"}],
            "accounts": {"store": "file", "path": "accounts.toml"},
            "providers": {"main": {"type": "webhook", "url": "https://api.example.com/v1"}},
            **sections,
        },
        base_dir=tmp_path,
    )


@pytest.mark.parametrize(
    ("account", "message"),
    [
        (Account(name="a", route=("mian",)), r"accounts\.a\.route: no provider named 'mian'"),
        (Account(name="b", provider_settings={"other": {"token": "t"}}), r"accounts\.b\.providers\.other: no such provider"),
        (Account(name="c", provider_settings={"main": {"tokne": "t"}}), r"accounts\.c\.providers\.main\.tokne: unknown key"),
    ],
)
def test_accounts_checked_against_providers(tmp_path: Path, account: Account, message: str) -> None:
    """An account naming a missing provider or a misspelt setting stops start-up
    (a misspelt token would otherwise silently fall back to the server's)."""
    with pytest.raises(ConfigError, match=message):
        check_accounts(file_config(tmp_path), Listing(account))
    check_accounts(file_config(tmp_path), Listing(Account(name="ok", route=("main",), provider_settings={"main": {"token": "t"}})))


def test_second_server_on_one_state_dir_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two servers delivering one queue would send every message twice: the second
    stops at start-up (after waiting SPOOL_LOCK_WAIT) with one line naming the state directory."""
    from twisted.internet.task import Clock

    from mailgate import build
    from mailgate.build import build_queue
    from mailgate.dispatch import Dispatcher

    monkeypatch.setattr(build, "SPOOL_LOCK_WAIT", 0.2)
    config = file_config(tmp_path)
    config.server.state_dir.mkdir()
    dispatcher = Dispatcher({}, (), Clock())
    spool, _, _ = build_queue(config, Clock(), dispatcher)
    try:
        with pytest.raises(ConfigError, match=r"server\.state_dir: .* in use by another mailgate process"):
            build_queue(config, Clock(), dispatcher)
    finally:
        spool.unlock()


def test_start_up_waits_for_the_spool_writer_of_a_server_that_died(tmp_path: Path) -> None:
    """The spool writer process of a killed server holds the spool lock until it has
    finished its last batch: a new server waits for it, then starts."""
    import subprocess
    import sys

    from twisted.internet.task import Clock

    from mailgate.build import build_queue
    from mailgate.dispatch import Dispatcher

    config = file_config(tmp_path)
    (config.server.state_dir / "queue").mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(0.5)",
            str(config.server.state_dir / "queue" / "lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"  # held now: without waiting, build_queue would refuse
        spool, _, _ = build_queue(config, Clock(), Dispatcher({}, (), Clock()))
        assert spool.locked
        spool.unlock()
    finally:
        holder.wait(10)
        holder.stdout.close()


def test_the_queue_parses_stored_messages_whatever_the_limits_now(tmp_path: Path) -> None:
    """A message in the spool passed the limits in force when it got its 250: parsing
    it again after a restart with stricter ``[limits]`` must not bounce it."""
    from twisted.internet.task import Clock

    from mailgate.build import build_queue, make_parser, mime_limits
    from mailgate.dispatch import Dispatcher
    from mailgate.message import MessageParseError

    config = file_config(tmp_path, limits={"max_addresses_per_header": 2})
    config.server.state_dir.mkdir()
    raw = b"From: a@example.com\r\nTo: b@example.org, c@example.org, d@example.org\r\nSubject: s\r\n\r\nhi\r\n"
    with pytest.raises(MessageParseError):  # what a new message gets now
        make_parser(Clock(), mime_limits(config.limits))(raw, "a@example.com", ("b@example.org",), {})
    spool, runner, _ = build_queue(config, Clock(), Dispatcher({}, (), Clock()))
    try:
        email = runner.parse(raw, "a@example.com", ("b@example.org",), {})
        assert [to.address for to in email.to] == ["b@example.org", "c@example.org", "d@example.org"]
    finally:
        spool.unlock()
