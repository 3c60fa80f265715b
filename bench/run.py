"""One benchmark run: mailgate (sync and queue mode) vs the aiosmtpd + aiohttp baseline.

    .venv/bin/python bench/run.py            # from the repository root, after pip install ".[bench]"

Generates a self-signed ECDSA P-256 certificate (used by both servers), an
accounts file (through ``mailgate account add``), starts the HTTP sink, mailgate
(``twistd -n mailgate``) and the baseline as separate processes on free
loopback ports, waits for their 220 banners, warms both up, then runs every
scenario ``--reps`` times, alternating the two servers (and the order of the
pair on each repetition), each load generator run in its own process.
Prints the medians as a markdown table and the ratios against the targets.

``mailgate-queue`` is a second mailgate process in queue mode (its own spool,
fsync on, as always): its msg/s is the rate at which messages are accepted
(250 "queued as"), and after each of its runs the sink is watched until every
accepted message has arrived: "drain msg/s" = accepted messages / (load time +
time until the sink has them all).  Drain keeping up means the two are close.
All processes are stopped at the end, also on error or Ctrl-C.

Scenarios:
  (a) persistent: 20 sessions x 50 messages, concurrently
  (b) oneshot:    500 messages, each in its own session (TCP + TLS handshake
                  + AUTH), 20 sessions at a time
  (c) latency:    1 session x 200 messages, sequential; plus the same number of
                  POSTs straight to the sink on one keep-alive connection.
                  "added p50" = server's final-dot p50 - direct HTTP p50.

``--auth apikey`` (default) logs in with a ``mailgate account add
--generate-key`` key (stored as sha256$, checked in microseconds by both
servers); ``--auth password`` uses the scrypt-hashed password (N=2^15, r=8,
p=3: ~0.3 s of CPU per login on this kind of machine, for both servers), which
makes scenario (b) a measure of scrypt, not of the gateway; its default
workload is then reduced.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PYTHON = sys.executable
TWISTD = str(Path(PYTHON).with_name("twistd"))
TOKEN = "bench-token-not-secret"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- setup ---------------------------------------------------------------------


def make_certificate(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mailgate_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def write_config(directory: Path, cert: Path, key: Path, port: int, sink_port: int, mode: str = "sync") -> Path:
    config = directory / f"mailgate-{mode}.toml"
    (directory / ("state" if mode == "sync" else "state-" + mode)).mkdir(exist_ok=True)
    config.write_text(
        f"""\
[server]
hostname = "localhost"
state_dir = "{directory / ('state' if mode == 'sync' else 'state-' + mode)}"

[tls]
certificate = "{cert}"
private_key = "{key}"

[[listeners]]
endpoint = "tcp:{port}:interface=127.0.0.1"
role = "submission"

[delivery]
mode = "{mode}"
api_timeout = 30

[limits]
max_message_size = "10MiB"

[accounts]
store = "file"
path = "{directory / 'accounts.toml'}"

[providers.sink]
type = "webhook"
url = "http://127.0.0.1:{sink_port}/v1/emails"
token = "{TOKEN}"
"""
    )
    return config


def mailgate_cli(*argv: str) -> str:
    result = subprocess.run(
        [PYTHON, "-m", "mailgate.cli", *argv],
        cwd=REPO, env=mailgate_env(), capture_output=True, text=True, timeout=60,
    )
    if result.returncode != 0:
        raise RuntimeError(f"mailgate {' '.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout


def make_accounts(config: Path) -> str:
    """Create 'bench' (scrypt password 'benchpass') and 'benchkey' (API key); return the key."""
    mailgate_cli("account", "add", "--config", str(config), "bench", "--password", "benchpass")
    out = mailgate_cli("account", "add", "--config", str(config), "benchkey", "--generate-key")
    return out.strip().splitlines()[-1].strip()


# -- processes -----------------------------------------------------------------


class Processes:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], log: Path, **kw) -> subprocess.Popen:
        handle = open(log, "wb")
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        handle.close()
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_for_banner(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(5)
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"no 220 banner on port {port} within {timeout} s; log {log}")


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode})")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not listening")


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # fields[0] is state (field 3); utime and stime are fields 14 and 15.
    # Threads' time is included (scrypt threads, Twisted's pool).
    return int(fields[11]) + int(fields[12])


def sink_stats(port: int) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /__stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return json.loads(data.partition(b"\r\n\r\n")[2])


def loadgen(argv: list[str], server_pid: int | None, sink_pid: int, timeout: float = 300) -> dict:
    before = (cpu_ticks(server_pid) if server_pid else 0, cpu_ticks(sink_pid))
    result = subprocess.run(
        [PYTHON, str(HERE / "loadgen.py"), *argv, "--json"], capture_output=True, text=True, timeout=timeout
    )
    after = (cpu_ticks(server_pid) if server_pid else 0, cpu_ticks(sink_pid))
    if result.returncode != 0:
        raise RuntimeError(f"loadgen {argv} failed:\n{result.stderr}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    wall = out["wall_s"]
    out["server_cpu_pct"] = round(100.0 * (after[0] - before[0]) / CLK_TCK / wall, 1) if server_pid else None
    out["sink_cpu_pct"] = round(100.0 * (after[1] - before[1]) / CLK_TCK / wall, 1)
    if out["errors"]:
        print(f"    !! {out['errors']} errors: {out['error_samples'][:3]}", file=sys.stderr)
    return out


def wait_for_drain(sink_port: int, target: int, timeout: float = 300) -> float:
    """Seconds until the sink has seen ``target`` requests (queue mode's backlog drained)."""
    started = time.monotonic()
    while sink_stats(sink_port)["requests"] < target:
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"queue did not drain within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - started


# -- main ----------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description="mailgate vs aiosmtpd+aiohttp benchmark (one run)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--auth", choices=("apikey", "password"), default="apikey")
    parser.add_argument("--sessions", type=int, default=20, help="(a) concurrent sessions")
    parser.add_argument("--messages", type=int, default=50, help="(a) messages per session")
    parser.add_argument("--oneshot-total", type=int, default=None, help="(b) messages (default 500; 40 with --auth password)")
    parser.add_argument("--oneshot-concurrency", type=int, default=20)
    parser.add_argument("--seq", type=int, default=200, help="(c) sequential messages")
    parser.add_argument("--scenarios", default="abc")
    parser.add_argument("--only", choices=("mailgate", "mailgate-queue", "baseline"), action="append", default=None,
                        help="run only this server (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    parser.add_argument("--json-out", default=None, help="also write all raw results here")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="after the measured runs, run each scenario once more per server under "
                             "py-spy (pip install py-spy) and write collapsed stacks + a hotspot summary to DIR")
    args = parser.parse_args()
    oneshot_total = args.oneshot_total or (40 if args.auth == "password" else 500)

    tmp = Path(tempfile.mkdtemp(prefix="mailgate-bench-"))
    procs = Processes()
    try:
        (tmp / "state").mkdir()
        cert, key = make_certificate(tmp)
        sink_port, mg_port, mq_port, bl_port = free_port(), free_port(), free_port(), free_port()
        config = write_config(tmp, cert, key, mg_port, sink_port)
        queue_config = write_config(tmp, cert, key, mq_port, sink_port, mode="queue")
        api_key = make_accounts(config)
        user, password = ("benchkey", api_key) if args.auth == "apikey" else ("bench", "benchpass")

        sink = procs.start([PYTHON, str(HERE / "sink.py"), "--port", str(sink_port), "--token", TOKEN], tmp / "sink.log")
        wait_for_port(sink_port, sink)
        servers: dict[str, tuple[int, subprocess.Popen]] = {}
        wanted = args.only or ["mailgate", "mailgate-queue", "baseline"]
        for name, port, path in (("mailgate", mg_port, config), ("mailgate-queue", mq_port, queue_config)):
            if name in wanted:
                log = tmp / f"{name}.log"
                proc = procs.start(
                    [TWISTD, "-n", "--pidfile=", f"--logfile={tmp / (name + '-twistd.log')}", "mailgate",
                     "--config", str(path)],
                    log, cwd=REPO, env=mailgate_env(),
                )
                servers[name] = (port, proc)
        if "baseline" in wanted:
            log = tmp / "baseline.log"
            proc = procs.start(
                [PYTHON, str(HERE / "baseline_aiosmtpd.py"), "--port", str(bl_port), "--cert", str(cert),
                 "--key", str(key), "--accounts", str(tmp / "accounts.toml"),
                 "--url", f"http://127.0.0.1:{sink_port}/v1/emails", "--token", TOKEN,
                 "--log", str(tmp / "baseline-app.log")],
                log,
            )
            servers["baseline"] = (bl_port, proc)
        for name, (port, proc) in servers.items():
            wait_for_banner(port, proc, tmp / f"{name}.log")
        print(f"# temp dir {tmp}; sink :{sink_port}, mailgate :{mg_port}, mailgate-queue :{mq_port}, "
              f"baseline :{bl_port}; auth={args.auth}", file=sys.stderr)

        common = ["--user", user, "--password", password]
        scenarios = {
            "a": ("persistent", ["--sessions", str(args.sessions), "--messages", str(args.messages)]),
            "b": ("oneshot", ["--total", str(oneshot_total), "--concurrency", str(args.oneshot_concurrency)]),
            "c": ("persistent", ["--sessions", "1", "--messages", str(args.seq)]),
        }
        # Warm-up: imports, JIT-less caches, connection pools, TLS session state.
        for name, (port, proc) in servers.items():
            for mode, extra in (("persistent", ["--sessions", "4", "--messages", "25"]),
                                ("oneshot", ["--total", "20", "--concurrency", "4"])):
                loadgen([mode, "--port", str(port), *common, *extra], proc.pid, sink.pid)
                if name == "mailgate-queue":
                    wait_for_drain(sink_port, sink_stats(sink_port)["requests"])
        sink_url = f"http://127.0.0.1:{sink_port}/v1/emails"
        loadgen(["http", "--url", sink_url, "--total", "100", "--token", TOKEN], None, sink.pid)

        results: dict[str, dict[str, list[dict]]] = {s: {n: [] for n in [*servers, "http"]} for s in args.scenarios}
        started = time.monotonic()
        for rep in range(args.reps):
            order = list(servers) if rep % 2 == 0 else list(reversed(servers))
            for scenario in args.scenarios:
                mode, extra = scenarios[scenario]
                for name in order:
                    port, proc = servers[name]
                    before = sink_stats(sink_port)["requests"]
                    out = loadgen([mode, "--port", str(port), *common, *extra, "--label", f"{scenario}/{name}"],
                                  proc.pid, sink.pid)
                    if name == "mailgate-queue":
                        backlog = before + out["ok"] - sink_stats(sink_port)["requests"]
                        tail = wait_for_drain(sink_port, before + out["ok"])
                        out["backlog_at_end"] = backlog
                        out["drain_msgs_per_s"] = round(out["ok"] / (out["wall_s"] + tail), 2)
                    results[scenario][name].append(out)
                    drain = f"  drain {out['drain_msgs_per_s']:.1f} msg/s (backlog {out['backlog_at_end']})" \
                        if "drain_msgs_per_s" in out else ""
                    print(f"  rep {rep + 1} ({scenario}) {name:14s}: {out['msgs_per_s']:8.1f} msg/s  "
                          f"p50 {out['p50_ms']:7.2f} ms  p99 {out['p99_ms']:7.2f} ms  err {out['errors']}  "
                          f"cpu server {out['server_cpu_pct']}% sink {out['sink_cpu_pct']}% "
                          f"loadgen {out['loadgen_cpu_pct']}%{drain}", file=sys.stderr)
                if scenario == "c":
                    out = loadgen(["http", "--url", sink_url, "--total", str(args.seq), "--token", TOKEN],
                                  None, sink.pid)
                    results[scenario]["http"].append(out)
                    print(f"  rep {rep + 1} (c) direct  : p50 {out['p50_ms']:7.3f} ms", file=sys.stderr)
        elapsed = time.monotonic() - started

        stats = sink_stats(sink_port)
        report(results, servers, args, oneshot_total, elapsed, stats)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(results, indent=1))
        if args.profile:
            profile(Path(args.profile), servers, scenarios, common, sink.pid, args.scenarios)
        return 0
    finally:
        procs.stop_all()
        if args.keep:
            print(f"# kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def profile(directory: Path, servers, scenarios, common, sink_pid, which) -> None:
    """Sample each server with py-spy during one more run of each scenario (not measured)."""
    pyspy = shutil.which("py-spy") or str(Path(PYTHON).with_name("py-spy"))
    directory.mkdir(parents=True, exist_ok=True)
    for scenario in which:
        mode, extra = scenarios[scenario]
        for name, (port, proc) in servers.items():
            out = directory / f"{scenario}-{name}.txt"
            spy = subprocess.Popen([pyspy, "record", "--pid", str(proc.pid), "--rate", "250", "--format", "raw",
                                    "--threads", "--output", str(out)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
            try:
                loadgen([mode, "--port", str(port), *common, *extra], proc.pid, sink_pid)
            finally:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
            summary = directory / f"{scenario}-{name}-top.txt"
            summary.write_text(hotspots(out))
            print(f"# profile {scenario}/{name}: {out} (summary {summary})", file=sys.stderr)


def hotspots(collapsed: Path, top: int = 40) -> str:
    """Self time and inclusive time per frame ("function (file:line)") from py-spy raw output."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith("thread (") and not f.startswith("process ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        # inclusive by function (file, no line) so recursion/lines are not double counted
        seen = set()
        for frame in frames:
            key = frame.rsplit(":", 1)[0] if frame.endswith(")") else frame
            if key not in seen:
                seen.add(key)
                inclusive[key] = inclusive.get(key, 0) + count
    lines = [f"{total} samples", "", "SELF (frame with line):"]
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100.0 * count / total:6.2f}%  {frame}")
    lines += ["", "INCLUSIVE (function):"]
    for frame, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[: top * 2]:
        lines.append(f"{100.0 * count / total:6.2f}%  {frame}")
    return "\n".join(lines) + "\n"


def med(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def report(results, servers, args, oneshot_total, elapsed, stats) -> None:
    names = {
        "a": f"(a) {args.sessions} sessions x {args.messages} msgs",
        "b": f"(b) {oneshot_total} msgs, 1 per session, {args.oneshot_concurrency} concurrent",
        "c": f"(c) 1 session x {args.seq} msgs",
    }
    both = "mailgate" in servers and "baseline" in servers
    print(f"\nMedians of {args.reps} repetitions (auth={args.auth}); measured part took {elapsed:.0f} s.\n")
    print("| scenario | server | msg/s | p50 ms | p99 ms | errors | server CPU % | sink CPU % | loadgen CPU % |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in args.scenarios:
        for name in servers:
            runs = results[s][name]
            print(f"| {names[s]} | {name} | {med(runs, 'msgs_per_s'):.1f} | {med(runs, 'p50_ms'):.2f} | "
                  f"{med(runs, 'p99_ms'):.2f} | {sum(r['errors'] for r in runs)} | {med(runs, 'server_cpu_pct'):.0f} | "
                  f"{med(runs, 'sink_cpu_pct'):.0f} | {med(runs, 'loadgen_cpu_pct'):.0f} |")
        if s == "c":
            runs = results[s]["http"]
            print(f"| {names[s]} | direct HTTP to sink | {med(runs, 'msgs_per_s'):.1f} | {med(runs, 'p50_ms'):.3f} | "
                  f"{med(runs, 'p99_ms'):.3f} | {sum(r['errors'] for r in runs)} | - | {med(runs, 'sink_cpu_pct'):.0f} | "
                  f"{med(runs, 'loadgen_cpu_pct'):.0f} |")
    print()
    if both:
        print("| target | measured | goal | met |")
        print("|---|---:|---:|---|")
        for s, goal in (("a", 2.0), ("b", 1.5)):
            if s in args.scenarios:
                ratio = med(results[s]["mailgate"], "msgs_per_s") / med(results[s]["baseline"], "msgs_per_s")
                print(f"| {names[s]}: mailgate/baseline msg/s | {ratio:.2f}x | >= {goal}x | {'yes' if ratio >= goal else 'NO'} |")
        if "a" in args.scenarios:
            ratio = med(results["a"]["baseline"], "p50_ms") / med(results["a"]["mailgate"], "p50_ms")
            print(f"| (a) p50 latency baseline/mailgate (info) | {ratio:.2f}x | - | - |")
    if "mailgate-queue" in servers and "baseline" in servers:
        if not both:
            print("| target | measured | goal | met |")
            print("|---|---:|---:|---|")
        for s in args.scenarios:
            runs, base = results[s]["mailgate-queue"], med(results[s]["baseline"], "msgs_per_s")
            accepted, drained = med(runs, "msgs_per_s"), med(runs, "drain_msgs_per_s")
            met = accepted / base >= 1.5
            print(f"| {names[s]}: mailgate-queue accepted / baseline sync msg/s | {accepted / base:.2f}x | >= 1.5x | "
                  f"{'yes' if met else 'NO'} |")
            print(f"| {names[s]}: mailgate-queue drain / accepted msg/s | {drained:.1f} / {accepted:.1f} "
                  f"(backlog at end {med(runs, 'backlog_at_end'):.0f}) | drain keeps up | "
                  f"{'yes' if drained >= 0.9 * accepted else 'NO'} |")
    if "c" in args.scenarios:
        direct = med(results["c"]["http"], "p50_ms")
        for name in servers:
            added = med(results["c"][name], "p50_ms") - direct
            goal = " | < 1 ms | " + ("yes" if added < 1.0 else "NO") + " |" if name == "mailgate" else " | - | - |"
            print(f"| (c) p50 added by {name} | {added:.3f} ms{goal}")
        print("\n'added p50' = median over repetitions of the server's final-dot->250 p50, minus the median "
              "p50 of a keep-alive POST of a same-sized JSON document straight to the sink.")
    print(f"\nSink saw {stats['requests']} accepted requests, {stats['refused']} refused (bad token).")


if __name__ == "__main__":
    sys.exit(main())
