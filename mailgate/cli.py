"""The ``mailgate`` command: operator tasks outside the running server.

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
import getpass
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import tomli_w

from mailgate import passwords
from mailgate.accounts.filestore import parse_account
from mailgate.atomicfile import write_atomically
from mailgate.configvalues import ConfigError

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
    return parser


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
