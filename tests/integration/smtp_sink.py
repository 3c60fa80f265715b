"""Postfix's smtp-sink as a scripted upstream SMTP server on loopback.

smtp-sink (Debian package ``postfix``) accepts mail and throws it away, or
dumps each transaction to a file (``-d``), and injects faults through its
options: ``-r``/``-f`` soft/hard-reject commands, ``-b``/``-B`` set those
replies, ``-W command:delay`` delays a reply, ``-Q`` answers 421 and hangs up.
It listens on port 0 (an ephemeral port); the port it got is read from
``/proc`` (its listening socket's inode), so no port is ever guessed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

SMTP_SINK = "/usr/sbin/smtp-sink"


@dataclass
class Sink:
    port: int
    dump_dir: Path

    def dumps(self) -> list[bytes]:
        """Every dumped transaction, oldest first."""
        files = sorted(self.dump_dir.glob("sink.*"), key=lambda p: p.stat().st_mtime_ns)
        return [path.read_bytes() for path in files]


def _listening_port(pid: int) -> int | None:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[9] in inodes and fields[3] == "0A":  # 0A: LISTEN
                return int(fields[1].split(":")[1], 16)
    return None


@contextmanager
def smtp_sink(tmp_path: Path, options: Sequence[str] = ()) -> Iterator[Sink]:
    """Run smtp-sink on 127.0.0.1 (an ephemeral port) with ``options``; stop it afterwards."""
    if shutil.which(SMTP_SINK) is None and not Path(SMTP_SINK).exists():
        pytest.fail("smtp-sink is required for these tests (apt-get install postfix)")
    dump_dir = tmp_path / "sink"
    dump_dir.mkdir()
    # smtp-sink insists on -u when started as root; it then keeps that user.
    user = ["-u", pwd.getpwuid(os.geteuid()).pw_name] if os.geteuid() == 0 else []
    process = subprocess.Popen(
        [SMTP_SINK, "-4", *user, "-d", f"{dump_dir}/sink.", *options, "127.0.0.1:0", "64"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None:
            if process.poll() is not None:
                pytest.fail(f"smtp-sink exited: {process.stderr.read().decode(errors='replace') if process.stderr else ''}")
            if time.monotonic() > deadline:
                pytest.fail("smtp-sink did not start listening within 60 s")
            port = _listening_port(process.pid)
            if port is None:
                time.sleep(0.02)
        yield Sink(port, dump_dir)
    finally:
        process.terminate()
        process.wait(timeout=30)
        if process.stderr is not None:
            process.stderr.close()
