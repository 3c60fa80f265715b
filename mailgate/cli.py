"""The ``mailgate`` command: operator tasks outside the running server.

``mailgate queue list|show|retry|delete|flush`` inspect and steer the queue
(:mod:`mailgate.queuecontrol` explains how they cooperate with a running
server: through its control socket, never by editing its files).

``mailgate account add|passwd|remove|list`` manage the ``file`` account store
(:mod:`mailgate.accounts.filestore`).  Secrets are hashed before they touch the
disk (scrypt for passwords, SHA-256 for generated API keys) and never echoed.
The accounts file is rewritten atomically (a temporary file in the same
directory, fsynced, renamed over the old one, directory fsynced), with mode
0600 and the previous owner, so a crash leaves either the old or the new file
and the server never reads half of one.  The rewrite goes through
:mod:`tomli_w`, so comments in the accounts file are not preserved.  A running
server reads the new file when it reloads its accounts (SIGHUP).

``mailgate check`` (:mod:`mailgate.check`) and ``mailgate send-test``
(:mod:`mailgate.sendtest`) exit 1 when what they check or send failed.

Every subcommand is one ``_cmd_*`` function; :func:`main` parses and
dispatches.  Errors print one line, ``mailgate: error: ...``, and exit 2.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import tomli_w

from mailgate import passwords, queuecontrol
from mailgate.accounts.filestore import parse_account
from mailgate.atomicfile import write_atomically
from mailgate.configvalues import ConfigError
from mailgate.queue import describe_entry
from mailgate.spool import CorruptEntry, EntryState, Spool, SpoolLocked, headers_of, is_queue_id

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1  # The command ran; what it checked or sent failed.
EXIT_ERROR = 2


class CommandError(Exception):
    """A failure to report as one line on stderr (the message never holds a secret)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so that
    usage errors look like every other error."""

    def error(self, message: str) -> NoReturn:
        raise CommandError(f"{message} (see `{self.prog} --help`)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mailgate`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else EXIT_OK
    except (CommandError, ConfigError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted")
    except Exception as e:  # the promise is one line, never a traceback
        return _fail(f"unexpected {type(e).__name__}: {e}")


def _fail(message: str) -> int:
    print(f"mailgate: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mailgate", description="SMTP front door for transactional email APIs.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    account = commands.add_parser("account", help="manage the accounts of the file store")
    actions = account.add_subparsers(title="account commands", metavar="ACTION", required=True)

    def action(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> Any:
        sub = actions.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        sub.add_argument(
            "--config",
            required=True,
            type=Path,
            metavar="PATH",
            help="mailgate configuration file; its [accounts] path names the accounts file",
        )
        return sub

    add = action("add", _cmd_account_add, "add an account")
    add.add_argument("user", metavar="USER")
    _secret_options(add)
    add.add_argument(
        "--cram-md5",
        action="store_true",
        help="also store the CRAM-MD5 state (password-equivalent for CRAM-MD5; "
        "only for clients that need it)",
    )
    add.add_argument(
        "--route",
        metavar="A,B",
        help="provider names in failover order (default: the server's route)",
    )
    add.add_argument(
        "--allow-sender",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="an allowed sender address or @domain (repeatable; default: any sender)",
    )

    passwd = action("passwd", _cmd_account_passwd, "set a new password or API key")
    passwd.add_argument("user", metavar="USER")
    _secret_options(passwd)
    passwd.add_argument(
        "--cram-md5",
        dest="cram_md5",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="store (or with --no-cram-md5 drop) the CRAM-MD5 state "
        "(default: keep CRAM-MD5 if the account had it)",
    )

    remove = action("remove", _cmd_account_remove, "remove an account")
    remove.add_argument("user", metavar="USER")

    action("list", _cmd_account_list, "list accounts (never their hashes)")

    check = commands.add_parser(
        "check",
        help="check a configuration: file, certificate, accounts, listeners, provider credentials",
        description="One line per check (OK, WARN, FAIL, SKIP); exit status 1 when any check failed.",
    )
    check.set_defaults(handler=_cmd_check)
    check.add_argument("--config", required=True, type=Path, metavar="PATH", help="mailgate configuration file")

    send = commands.add_parser(
        "send-test",
        help="send a test message through the running gateway",
        description="Connects to a configured listener like a client (TLS, AUTH), sends one message "
        "and prints the final reply; exit status 1 unless it is 2xx.",
    )
    send.set_defaults(handler=_cmd_send_test)
    send.add_argument("--config", required=True, type=Path, metavar="PATH", help="mailgate configuration file")
    send.add_argument("--to", required=True, metavar="ADDRESS", help="the recipient")
    send.add_argument("--from", dest="sender", metavar="ADDRESS", help="the sender (default: mailgate-test@HOSTNAME)")
    send.add_argument("--listener", type=int, default=0, metavar="N", help="which [[listeners]] entry, from 0 (default 0)")
    send.add_argument("--server", metavar="HOST:PORT", help="connect here instead of the listener's own address")
    send.add_argument("--user", metavar="USER", help="log in as USER (AUTH)")
    send.add_argument(
        "--password-file", type=Path, metavar="FILE", help='file holding the password ("-": standard input)'
    )
    send.add_argument("--show-dialogue", action="store_true", help="print the SMTP dialogue (AUTH redacted)")
    _queue_parser(commands)
    return parser


def _queue_parser(commands: Any) -> None:
    queue = commands.add_parser(
        "queue",
        help="inspect and steer the delivery queue (also while the server runs)",
        description="Inspect and steer the queue of accepted messages.  While mailgate runs, "
        "these commands go through its control socket; otherwise they work on the files.",
    )
    actions = queue.add_subparsers(title="queue commands", metavar="ACTION", required=True)

    def action(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> Any:
        sub = actions.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        where = sub.add_mutually_exclusive_group(required=True)
        where.add_argument("--config", type=Path, metavar="PATH", help="mailgate configuration file (its [server] state_dir)")
        where.add_argument("--state-dir", type=Path, metavar="DIR", help="the server's state directory")
        return sub

    listing = action("list", _cmd_queue_list, "list queued messages: state, attempts, next attempt, last error")
    listing.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    show = action("show", _cmd_queue_show, "show one message: envelope, delivery state and headers")
    show.add_argument("id", metavar="ID")
    retry = action("retry", _cmd_queue_retry, "try a deferred message (or all of them) now")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("id", metavar="ID", nargs="?")
    which.add_argument("--all", action="store_true", help="every deferred message")
    delete = action("delete", _cmd_queue_delete, "delete a message without notifying its sender")
    delete.add_argument("id", metavar="ID")
    flush = action("flush", _cmd_queue_flush, "try every queued message now and wait for the results (server must run)")
    flush.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS", help="how long to wait (default 300)")


def _secret_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--password",
        metavar="SECRET",
        help="the password (visible to other local users in the process list; "
        "without this option it is prompted for, or read as one line from stdin)",
    )
    group.add_argument(
        "--generate-key",
        action="store_true",
        help="generate a random API key, print it once, store only its SHA-256",
    )


# -- subcommands ---------------------------------------------------------------


def _cmd_account_add(args: argparse.Namespace) -> int:
    path = _accounts_path(args.config)
    document = _read_accounts(path, missing_ok=True)
    accounts = document.setdefault("accounts", {})
    if args.user in accounts:
        raise CommandError(f"account {args.user!r} already exists (use `mailgate account passwd`)")
    entry: dict[str, Any] = {}
    if args.route is not None:
        entry["route"] = [name.strip() for name in args.route.split(",")]
    if args.allow_sender:
        entry["allowed_senders"] = list(args.allow_sender)
    # Validate what we are about to write before asking for a secret; the
    # placeholder hash makes the entry complete.
    parse_account(args.user, {"password": passwords.hash_api_key(""), **entry})
    secret, generated = _obtain_secret(args)
    accounts[args.user] = {**_secret_fields(secret, generated, args.cram_md5), **entry}
    _write_accounts(path, document)
    _announce(secret, generated)
    return EXIT_OK


def _cmd_account_passwd(args: argparse.Namespace) -> int:
    path = _accounts_path(args.config)
    document = _read_accounts(path)
    entry = _existing(document, args.user)
    cram_md5 = "cram_md5" in entry if args.cram_md5 is None else args.cram_md5
    secret, generated = _obtain_secret(args)
    entry.pop("cram_md5", None)
    entry.update(_secret_fields(secret, generated, cram_md5))
    _write_accounts(path, document)
    _announce(secret, generated)
    return EXIT_OK


def _cmd_account_remove(args: argparse.Namespace) -> int:
    path = _accounts_path(args.config)
    document = _read_accounts(path)
    _existing(document, args.user)
    del document["accounts"][args.user]
    _write_accounts(path, document)
    return EXIT_OK


def _cmd_account_list(args: argparse.Namespace) -> int:
    path = _accounts_path(args.config)
    accounts = _read_accounts(path).get("accounts", {})
    rows = [("NAME", "AUTH", "ROUTE", "ALLOWED SENDERS")]
    for name in sorted(accounts):
        entry = accounts[name]
        if not isinstance(entry, dict):
            raise CommandError(f"{path}: accounts.{name} is not a table")
        schemes = [passwords.hash_scheme(entry.get("password")) or "invalid"]
        if "cram_md5" in entry:
            schemes.append(passwords.hash_scheme(entry["cram_md5"]) or "invalid-cram-md5")
        route = entry.get("route") or ["(default)"]
        senders = entry.get("allowed_senders") or ["(any)"]
        rows.append((name, ",".join(schemes), ",".join(map(str, route)), ",".join(map(str, senders))))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    from twisted.internet import defer, task

    from mailgate.check import run_checks, summary
    from mailgate.transports import make_http_client

    async def main(reactor: Any) -> None:
        client, pool = make_http_client(reactor)
        try:
            verdicts = await run_checks(args.config, reactor, client, lambda v: print(v.line(), flush=True))
            text, status = summary(verdicts)
        except Exception as e:  # noqa: BLE001 - one line, never a traceback
            print(f"mailgate: error: unexpected {type(e).__name__}: {e}", file=sys.stderr)
            raise SystemExit(EXIT_ERROR) from None
        finally:
            await pool.closeCachedConnections()
        print(f"mailgate check: {text}")
        raise SystemExit(status)

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    return EXIT_ERROR  # react() always exits


def _cmd_send_test(args: argparse.Namespace) -> int:
    from mailgate.config import load_config
    from mailgate.sendtest import SendTestError, send_test

    if (args.user is None) != (args.password_file is None):
        raise CommandError("--user and --password-file go together")
    password = None
    if args.password_file is not None:
        try:
            raw = sys.stdin.readline() if str(args.password_file) == "-" else args.password_file.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CommandError(f"cannot read {args.password_file}: {getattr(e, 'strerror', None) or e}") from None
        password = raw.splitlines()[0] if raw.strip() else ""
        if not password:
            raise CommandError(f"{args.password_file}: no password in it")
    config = load_config(args.config)
    try:
        result = send_test(config, args.listener, args.to, args.sender, args.user, password, args.server)
    except SendTestError as e:
        raise CommandError(str(e)) from None
    if args.show_dialogue:
        print("\n".join(result.dialogue))
    print(result.reply)
    return EXIT_OK if 200 <= result.code < 300 else EXIT_FAILED
def _cmd_queue_list(args: argparse.Namespace) -> int:
    spool = _queue_spool(args)
    entries = _queue_call(spool, "list", offline=lambda: _offline_entries(spool))
    if args.json:
        print(json.dumps(entries, indent=1))
        return EXIT_OK
    if not entries:
        print("The queue is empty.")
        return EXIT_OK
    rows = [("ID", "STATE", "ARRIVED (UTC)", "TRIES", "NEXT ATTEMPT (UTC)", "SENDER -> RECIPIENTS")]
    for entry in entries:
        recipients = ", ".join(entry["recipients"])
        rows.append(
            (
                entry["id"],
                entry["state"],
                _when(entry["arrival"]),
                str(entry["attempts"]),
                _when(entry["next_attempt"]) if entry["state"] == "deferred" else "-",
                f"<{entry['sender']}> -> {recipients}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[5])
        if index and entries[index - 1]["last_error"]:
            print(" " * 4 + "last error: " + entries[index - 1]["last_error"])
    print(f"{len(entries)} message{'s' if len(entries) != 1 else ''}")
    return EXIT_OK


def _cmd_queue_show(args: argparse.Namespace) -> int:
    spool = _queue_spool(args)
    queue_id = _queue_id(args.id)
    entry = _queue_call(spool, "show", queue_id, offline=lambda: _offline_entry(spool, queue_id))
    try:
        _, raw = spool.load(queue_id)
    except FileNotFoundError:
        raise CommandError(f"no message {queue_id} in the queue") from None
    except (CorruptEntry, OSError) as e:
        raise CommandError(f"cannot read message {queue_id}: {e}") from None
    fields = [
        ("id", entry["id"]),
        ("state", entry["state"]),
        ("account", f"{entry['account']} (route: {', '.join(entry['route']) or 'server default'})"),
        ("arrived", _when(entry["arrival"])),
        ("sender", f"<{entry['sender']}>"),
        ("recipients", ", ".join(entry["recipients"])),
        ("attempts", str(entry["attempts"])),
        ("last attempt", _when(entry["last_attempt"])),
        ("next attempt", _when(entry["next_attempt"]) if entry["state"] == "deferred" else "-"),
        ("last error", entry["last_error"] or "-"),
        ("size", f"{len(raw)} bytes"),
    ]
    for name, value in fields:
        print(f"{name + ':':14s}{value}")
    print()
    sys.stdout.write(headers_of(raw).decode("utf-8", "replace").replace("\r\n", "\n"))
    return EXIT_OK


def _cmd_queue_retry(args: argparse.Namespace) -> int:
    spool = _queue_spool(args)
    if args.all:
        count = _queue_call(spool, "retry-all", offline=lambda: _offline_retry(spool, None))
        print(f"{count} deferred message{'s' if count != 1 else ''} scheduled for immediate delivery")
        return EXIT_OK
    queue_id = _queue_id(args.id)
    print(f"{queue_id}: " + _queue_call(spool, "retry", queue_id, offline=lambda: _offline_retry(spool, queue_id)))
    return EXIT_OK


def _cmd_queue_delete(args: argparse.Namespace) -> int:
    spool = _queue_spool(args)
    queue_id = _queue_id(args.id)
    print(f"{queue_id}: " + _queue_call(spool, "delete", queue_id, offline=lambda: _offline_delete(spool, queue_id)))
    return EXIT_OK


def _cmd_queue_flush(args: argparse.Namespace) -> int:
    spool = _queue_spool(args)

    def offline() -> Any:
        raise CommandError(
            "mailgate is not running: nothing can deliver now "
            "(when it starts, it delivers the queue; `mailgate queue retry --all` makes every message due)"
        )

    results = _queue_call(spool, "flush", offline=offline, timeout=args.timeout)
    summary = ", ".join(f"{count} {result}" for result, count in sorted(results.items())) or "the queue was empty"
    print(f"flushed: {summary}")
    return EXIT_OK


# -- queue helpers ---------------------------------------------------------------


def _queue_spool(args: argparse.Namespace) -> Spool:
    """The queue of the server configured by ``--config`` (its [server] state_dir,
    relative to the file's directory, default "mailgate-state") or ``--state-dir``."""
    if args.state_dir is not None:
        return Spool(args.state_dir / "queue")
    try:
        with open(args.config, "rb") as f:
            config = tomllib.load(f)
    except OSError as e:
        raise CommandError(f"cannot read {args.config}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise CommandError(f"{args.config}: not valid TOML: {e}") from None
    server = config.get("server", {})
    state_dir = server.get("state_dir", "mailgate-state") if isinstance(server, dict) else None
    if not isinstance(state_dir, str):
        raise CommandError(f"{args.config}: server.state_dir must be a string")
    return Spool(args.config.parent / Path(state_dir).expanduser() / "queue")


def _queue_id(text: str) -> str:
    if not is_queue_id(text):
        raise CommandError(f"{text!r} is not a queue id (22 characters A-Z, 2-7)")
    return text


def _queue_call(spool: Spool, command: str, queue_id: str | None = None, *, offline: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Ask the running server, or (none running) do it on the files under the queue lock."""
    if spool.locked_by_other():
        try:
            return queuecontrol.request(spool.control_path, command, queue_id, timeout=timeout)
        except queuecontrol.ControlError as e:
            raise CommandError(str(e)) from None
        except PermissionError:
            raise CommandError(f"permission denied on {spool.control_path}: run as the server's user") from None
        except OSError as e:
            raise CommandError(
                f"mailgate is running but its control socket {spool.control_path} does not answer ({e.strerror or e})"
            ) from None
    if not spool.directory.is_dir():
        return offline() if command == "flush" else ([] if command == "list" else _missing(queue_id))
    try:
        spool.lock()
    except SpoolLocked:
        raise CommandError("mailgate is starting or stopping; try again in a moment") from None
    except OSError as e:
        raise CommandError(f"cannot open the queue {spool.directory}: {e.strerror or e}") from None
    try:
        return offline()
    finally:
        spool.unlock()


def _missing(queue_id: str | None) -> Any:
    if queue_id is None:
        return 0
    raise CommandError(f"no message {queue_id} in the queue")


def _offline_entries(spool: Spool) -> list[dict[str, Any]]:
    return [describe_entry(envelope, state) for envelope, state in spool.entries()]


def _offline_entry(spool: Spool, queue_id: str) -> dict[str, Any]:
    try:
        envelope, _ = spool.load(queue_id)
    except FileNotFoundError:
        raise CommandError(f"no message {queue_id} in the queue") from None
    except CorruptEntry as e:
        raise CommandError(f"message {queue_id} is damaged: {e}") from None
    return describe_entry(envelope, spool.read_state(queue_id))


def _offline_retry(spool: Spool, queue_id: str | None) -> Any:
    if queue_id is not None:
        _offline_entry(spool, queue_id)
    count = 0
    for candidate in [queue_id] if queue_id else spool.ids():
        state = spool.read_state(candidate)
        if state.next_attempt is not None:
            spool.write_state(candidate, EntryState(state.attempts, None, state.last_error, state.last_attempt))
            count += 1
    if queue_id is None:
        return count
    return "will be tried as soon as mailgate starts" if count else "already due (tried as soon as mailgate starts)"


def _offline_delete(spool: Spool, queue_id: str) -> str:
    if not spool.exists(queue_id):
        raise CommandError(f"no message {queue_id} in the queue")
    spool.remove(queue_id)
    return "deleted"


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


# -- helpers -------------------------------------------------------------------


def _accounts_path(config_path: Path) -> Path:
    """The accounts file named by ``[accounts]`` in the main configuration file.

    Requires ``store = "file"``; a relative ``path`` is taken from the
    configuration file's directory.
    """
    try:
        with open(config_path, "rb") as f:
            config = tomllib.load(f)
    except OSError as e:
        raise CommandError(f"cannot read {config_path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise CommandError(f"{config_path}: not valid TOML: {e}") from None
    section = config.get("accounts")
    if not isinstance(section, dict):
        raise CommandError(f"{config_path}: no [accounts] table")
    store = section.get("store")
    if store != "file":
        raise CommandError(
            f'{config_path}: accounts.store is {store!r}; `mailgate account` manages '
            f'only store = "file"'
        )
    path = section.get("path")
    if not isinstance(path, str) or not path:
        raise CommandError(f"{config_path}: accounts.path must name the accounts file")
    return config_path.parent / path


def _read_accounts(path: Path, *, missing_ok: bool = False) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise CommandError(f"accounts file {path} does not exist") from None
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise CommandError(f"{path}: not valid TOML: {e}") from None
    if not isinstance(document.get("accounts", {}), dict):
        raise CommandError(f"{path}: accounts must be a table of [accounts.NAME] tables")
    return document


def _existing(document: dict[str, Any], user: str) -> dict[str, Any]:
    entry = document.get("accounts", {}).get(user)
    if entry is None:
        raise CommandError(f"no account {user!r}")
    if not isinstance(entry, dict):
        raise CommandError(f"accounts.{user} is not a table")
    return entry


def _obtain_secret(args: argparse.Namespace) -> tuple[str, bool]:
    """The new secret and whether we generated it: from --password, --generate-key,
    a prompt (twice) on a terminal, or else one line of stdin."""
    if args.generate_key:
        return passwords.generate_api_key(), True
    if args.password is not None:
        secret = args.password
    elif sys.stdin.isatty():
        secret = getpass.getpass("Password: ")
        if getpass.getpass("Password (again): ") != secret:
            raise CommandError("the passwords do not match")
    else:
        line = sys.stdin.readline()
        if not line:
            raise CommandError("no password on standard input")
        secret = line.removesuffix("\n").removesuffix("\r")
    if not secret:
        raise CommandError("the password is empty")
    if "\0" in secret:
        raise CommandError("the password contains a NUL character (SMTP AUTH cannot carry it)")
    return secret, False


def _secret_fields(secret: str, generated: bool, cram_md5: bool) -> dict[str, str]:
    fields = {
        "password": passwords.hash_api_key(secret) if generated else passwords.hash_password(secret)
    }
    if cram_md5:
        fields["cram_md5"] = passwords.cram_md5_state(secret)
    return fields


def _announce(secret: str, generated: bool) -> None:
    if generated:
        print(secret)
        print("mailgate: this API key is shown only once; store it now", file=sys.stderr)


def _write_accounts(path: Path, document: dict[str, Any]) -> None:
    """Replace ``path`` atomically with ``document`` (mode 0600, previous owner kept)."""
    try:
        write_atomically(path, tomli_w.dumps(document).encode("utf-8"), mode=0o600)
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror or e}") from None


if __name__ == "__main__":
    sys.exit(main())
