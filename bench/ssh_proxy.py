"""SSH proxy figures, direct to a real sshd vs through `custody proxy`, in one run.

    .venv/bin/python bench/ssh_proxy.py [--execs 20] [--mib 100] [--keys 300]

An sshd of its own on a free loopback port (the tests' helper,
tests/ssh_fixtures.py), and the proxy in front of it with recording on (dev
broker, spool, signing) and the default policy. Both sides log in with a key
and the real OpenSSH clients: direct as root with the key sshd trusts, through
the proxy with the certificate `custody ssh-login` got for a dev token (plain
`ssh -i KEY` afterwards), so both pay a public-key login.

  * exec round trip: `ssh host true`, a whole connection each, p50/p99;
  * sftp: one `--mib` MiB file put then got (`sftp -b`), MiB/s, the SHA-256
    of what arrived checked against the source each time;
  * keystroke echo: in `ssh -tt` with the remote terminal in non-canonical
    mode (`stty -icanon`, echo on), one byte written, the time until the
    remote terminal's echo of it is read back, p50/p99 over `--keys` keys.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))
from pg_proxy import free_port, stop, wait_port  # noqa: E402  (bench/ is sys.path[0] when run: their one owner)
from ssh_fixtures import start_sshd  # noqa: E402  (the tests' sshd: one place that knows how to start it)

USER = "bench@example.com"


class Target:
    """How OpenSSH reaches one side: port, user, key, pinned host key."""

    def __init__(self, work: Path, name: str, port: int, user: str, key: Path, host_key: str) -> None:
        self.port, self.user = port, user
        known = work / f"known_hosts-{name}"
        known.write_text(f"[127.0.0.1]:{port} {host_key}\n")
        self.options = ["-F", "/dev/null", "-o", f"Port={port}", "-o", f"User={user}", "-i", str(key),
                        "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "PreferredAuthentications=publickey",
                        "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR"]
        self.env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "DISPLAY")}

    def ssh(self, *command: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", *self.options, "127.0.0.1", *command], env=self.env, capture_output=True,
                              stdin=subprocess.DEVNULL, check=True, **kwargs)


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return statistics.median(samples), samples[max(0, int(len(samples) * 0.99) - 1)]


def exec_round_trips(target: Target, count: int) -> tuple[float, float]:
    target.ssh("true")  # warm: the page cache, sshd's first fork
    times = []
    for _ in range(count):
        start = time.perf_counter()
        target.ssh("true")
        times.append((time.perf_counter() - start) * 1000)
    return percentiles(times)


def sftp_transfer(target: Target, work: Path, source: Path, digest: str) -> tuple[float, float]:
    """put then get of `source`; MiB/s each, the bytes that arrived checked."""
    remote, back = work / f"remote-{target.port}", work / f"back-{target.port}"
    rates = []
    for batch, arrived in ((f"put {source} {remote}\n", remote), (f"get {remote} {back}\n", back)):
        script = work / "batch"
        script.write_text(batch)
        start = time.perf_counter()
        subprocess.run(["sftp", *target.options, "-b", str(script), "127.0.0.1"], env=target.env,
                       capture_output=True, stdin=subprocess.DEVNULL, check=True)
        elapsed = time.perf_counter() - start
        assert sha256(arrived) == digest, f"{arrived}: not the bytes sent"
        rates.append(source.stat().st_size / (1 << 20) / elapsed)
    remote.unlink()
    back.unlink()
    return rates[0], rates[1]


def keystroke_echo(target: Target, keys: int) -> tuple[float, float]:
    process = subprocess.Popen(["ssh", "-tt", *target.options, "127.0.0.1", "stty -icanon; echo ready; exec cat >/dev/null"],
                               env=target.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    out = process.stdout.fileno()

    def read_until(marker: bytes, timeout: float = 20.0) -> None:
        seen, deadline = b"", time.monotonic() + timeout
        while marker not in seen:
            ready, _, _ = select.select([out], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RuntimeError(f"no {marker!r} within {timeout} s (got {seen[-80:]!r})")
            chunk = os.read(out, 4096)
            if not chunk:
                raise RuntimeError(f"the session ended before {marker!r}")
            seen += chunk

    try:
        read_until(b"ready")
        times = []
        for i in range(keys + 20):
            key = b"abcdefghijklmnopqrstuvwxyz"[i % 26:i % 26 + 1]
            start = time.perf_counter()
            process.stdin.write(key)
            read_until(key)
            if i >= 20:  # the first keys warm the path
                times.append((time.perf_counter() - start) * 1000)
            time.sleep(0.002)  # a fast typist, not a flood
        return percentiles(times)
    finally:
        process.stdin.write(b"\x04")  # ^D: cat ends, the session with it
        process.stdin.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def start_proxy(work: Path, bootstrap: str, sshd) -> tuple[subprocess.Popen, Target]:
    from custody.config import load_config
    from custody.init import initialise
    from proxy.devidp import issue_token

    port = free_port()
    config = initialise(work / "custody", proxy_port=free_port())
    text = config.read_text().replace('bootstrap = "embedded"', f'bootstrap = "{bootstrap}"')
    text += f"""
[[proxy]]
name = "bench-ssh"
protocol = "ssh"
listen = "127.0.0.1:{port}"
upstream = "ssh://root@127.0.0.1:{sshd.port}"
upstream_key_file = "{sshd.client_key}"
upstream_host_key = "{sshd.host_key_pub}"
host_key_file = "keys/ssh_host_ed25519"
user_ca_key_file = "keys/ssh_user_ca"
policy = "policies/default.toml"
"""
    config.write_text(text)
    identity = load_config(config).identity
    token = issue_token(identity.dev_signing_key, identity.issuer, identity.audience, USER, ["dba"])
    custody = [sys.executable, "-m", "custody"]
    process = subprocess.Popen([*custody, "proxy", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_port(port)
    key = work / "id_ed25519"
    subprocess.run([*custody, "ssh-login", "--config", str(config), "--address", f"127.0.0.1:{port}",
                    "--key", str(key), "--token-env", "CUSTODY_BENCH_TOKEN"], cwd=ROOT, check=True,
                   env={**os.environ, "CUSTODY_BENCH_TOKEN": token}, capture_output=True)
    host_key = (config.parent / "keys" / "ssh_host_ed25519.pub").read_text().strip()
    return process, Target(work, "proxy", port, USER, key, host_key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--execs", type=int, default=20)
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--keys", type=int, default=300)
    args = parser.parse_args()
    from ingest.broker import DevBroker

    work = Path(tempfile.mkdtemp(prefix="custody-bench-ssh-"))
    source = work / "payload"
    with open(source, "wb") as f:
        for _ in range(args.mib):
            f.write(os.urandom(1 << 20))
    digest = sha256(source)
    sshd = start_sshd(work / "sshd")
    direct = Target(work, "direct", sshd.port, "root", sshd.client_key, sshd.host_key_pub)
    proxy = None
    try:
        with DevBroker(log_path=work / "broker.log") as broker:
            proxy, proxied = start_proxy(work, broker.bootstrap, sshd)
            figures = {}
            for name, target in (("direct", direct), ("proxy", proxied)):
                figures[name] = (exec_round_trips(target, args.execs), sftp_transfer(target, work, source, digest),
                                 keystroke_echo(target, args.keys))
    finally:
        stop(proxy)
        sshd.stop()
        source.unlink(missing_ok=True)
    (d_exec, d_sftp, d_key), (p_exec, p_sftp, p_key) = figures["direct"], figures["proxy"]
    print(f"ssh host true ({args.execs} connections) p50: direct {d_exec[0]:.1f} ms, proxy {p_exec[0]:.1f} ms "
          f"({p_exec[0] / d_exec[0]:.2f}x); p99: direct {d_exec[1]:.1f} ms, proxy {p_exec[1]:.1f} ms")
    for i, way in enumerate(("put", "get")):
        print(f"sftp {way} {args.mib} MiB: direct {d_sftp[i]:.1f} MiB/s, proxy {p_sftp[i]:.1f} MiB/s "
              f"({p_sftp[i] / d_sftp[i]:.2f}x), SHA-256 equal")
    print(f"keystroke echo ({args.keys} keys) p50: direct {d_key[0]:.2f} ms, proxy {p_key[0]:.2f} ms "
          f"({p_key[0] / d_key[0]:.2f}x); p99: direct {d_key[1]:.2f} ms, proxy {p_key[1]:.2f} ms")


if __name__ == "__main__":
    main()
