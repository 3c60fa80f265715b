"""The development default: what ``twistd -n mailgate`` runs without ``--config``.

Safe by construction: listeners on 127.0.0.1 only (2525 relay, 2587
submission, 2465 submissions), a self-signed certificate generated into the
state directory, one development account whose password is generated once and
kept in the state directory, and the ``capture`` provider, which writes each API
request it would have made as a JSON file into ``<state dir>/captured``.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import tomli_w

from mailgate import passwords
from mailgate.atomicfile import write_atomically
from mailgate.config import Config, parse_config

DEV_USERNAME = "dev"
DEV_STATE_DIR = "mailgate-dev"


def development_setup(state_dir: Path) -> tuple[Config, str, str]:
    """Create (once) the state directory, account and config; return them with the login."""
    state_dir = state_dir.resolve()
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    password = ensure_dev_account(state_dir)
    return development_config(state_dir), DEV_USERNAME, password


def ensure_dev_account(state_dir: Path) -> str:
    """The development password: read from ``dev-password``, or generated and stored.

    The accounts file keeps only hashes (scrypt and the CRAM-MD5 state), like any
    accounts file; the clear password is kept beside it (mode 0600) because a
    developer needs to read it.
    """
    password_file = state_dir / "dev-password"
    accounts_file = state_dir / "accounts.toml"
    if password_file.exists() and accounts_file.exists():
        return password_file.read_text(encoding="utf-8").strip()
    password = secrets.token_urlsafe(12)
    document = {
        "accounts": {
            DEV_USERNAME: {
                "password": passwords.hash_password(password),
                "cram_md5": passwords.cram_md5_state(password),
            }
        }
    }
    write_atomically(accounts_file, tomli_w.dumps(document).encode("utf-8"))
    write_atomically(password_file, (password + "\n").encode("utf-8"))
    return password


def development_config(state_dir: Path) -> Config:
    data = {
        "server": {"hostname": "localhost", "state_dir": str(state_dir)},
        "listeners": [
            {
                "endpoint": "tcp:2525:interface=127.0.0.1",
                "role": "relay",
                "trusted_networks": ["127.0.0.0/8", "::1/128"],
            },
            {"endpoint": "tcp:2587:interface=127.0.0.1", "role": "submission"},
            {"endpoint": "tcp:2465:interface=127.0.0.1", "role": "submissions"},
        ],
        "accounts": {"store": "file", "path": str(state_dir / "accounts.toml")},
        "providers": {"capture": {"type": "capture", "folder": str(state_dir / "captured")}},
    }
    return parse_config(data, base_dir=state_dir)
