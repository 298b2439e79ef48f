"""HTTP proxy benchmark: Custody beside the same run's baselines.

    .venv/bin/python bench/http_proxy.py [--seconds 10] [--connections 8]

Debian's nginx serves a small static page and a 1 MiB file on a loopback port (the origin, one worker).
`wrk` (Debian's package; `apt-get install -y wrk` is tried when it is missing) is the client, in its own
process, keep-alive, `--connections` connections, for `--seconds` per figure, against:

  * the origin directly;
  * nginx as a plain reverse proxy in front of it (one worker, keep-alive upstream connections, the
    client's Authorization replaced by an upstream bearer): what a user would otherwise put there;
  * `custody proxy` (`protocol = "http"`, the default policy, recording on: dev broker, spool, signing),
    the client's token verified once per connection, the upstream bearer injected.

Figures: small GETs, requests/s and latency p50/p99 (wrk's, under that closed-loop load); 1 MiB
responses, MiB/s. Ratios are Custody's over each baseline. The client is a `dba` (no [[mask]] applies:
bodies are streamed, not buffered for masking).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pg_proxy import free_port, wait_port  # noqa: E402  (bench/ is sys.path[1]: the one owner of these helpers)

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
USER = "alice@example.com"
BIG = 1 << 20
UPSTREAM_TOKEN = "bench-upstream-token"

COMMON = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    default_type application/octet-stream;
    types {{ text/html html; }}
    keepalive_requests 1000000;
{body}
}}
"""
ORIGIN = """\
    server {{
        listen 127.0.0.1:{port};
        root {dir}/www;
    }}"""
REVERSE = """\
    upstream origin {{ server 127.0.0.1:{origin}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {token}";
        }}
    }}"""


def start_nginx(directory: Path, body: str, port: int) -> subprocess.Popen:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "nginx.conf"
    config.write_text(COMMON.format(dir=directory, body=body))
    process = subprocess.Popen([NGINX, "-c", str(config), "-p", str(directory)], stdout=subprocess.DEVNULL,
                               stderr=open(directory / "stderr.log", "wb"))
    wait_port(port, timeout=30.0)
    return process


def start_custody(work: Path, bootstrap: str, origin: int) -> tuple[subprocess.Popen, int, str]:
    from custody.config import load_config
    from custody.init import initialise
    from proxy.devidp import issue_token

    port = free_port()
    config = initialise(work / "custody", proxy_port=free_port())
    (work / "custody" / "upstream.token").write_text(UPSTREAM_TOKEN + "\n")
    config.write_text(config.read_text().replace('bootstrap = "embedded"', f'bootstrap = "{bootstrap}"') + f"""
[[proxy]]
name = "bench-http"
protocol = "http"
listen = "127.0.0.1:{port}"
upstream = "http://127.0.0.1:{origin}"
upstream_bearer_file = "upstream.token"
policy = "policies/default.toml"
""")
    identity = load_config(config).identity
    token = issue_token(identity.dev_signing_key, identity.issuer, identity.audience, USER, ["dba"])
    process = subprocess.Popen([sys.executable, "-m", "custody", "proxy", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    wait_port(port, timeout=30.0)
    return process, port, token


def stop(process: subprocess.Popen | None, sig: int = signal.SIGTERM) -> str:
    if process is None or process.poll() is not None:
        return ""
    process.send_signal(sig)
    try:
        out, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    return out or ""


def find_wrk() -> str:
    found = shutil.which("wrk")
    if found is None and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "wrk"], capture_output=True)
        found = shutil.which("wrk")
    if found is None:
        sys.exit("bench/http_proxy.py needs wrk (Debian: apt-get install -y wrk)")
    return found


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)([a-z]+)", text).groups()
    return float(number) * _UNITS[unit]


def run_wrk(wrk: str, url: str, seconds: int, connections: int, token: str | None = None) -> dict[str, float]:
    """wrk's requests/s and p50/p99 latency (ms); any non-2xx answer or socket error fails the bench."""
    command = [wrk, "--latency", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "--timeout", "10s"]
    if token:
        command += ["-H", f"Authorization: Bearer {token}"]
    done = subprocess.run([*command, url], capture_output=True, text=True, timeout=seconds + 60)
    out = done.stdout
    if done.returncode != 0 or "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk {url}: {out}{done.stderr}")
    latency = dict(re.findall(r"^\s+(50|99)(?:\.000)?%\s+(\S+)\s*$", out, re.M))  # "1.07s " has a space
    if set(latency) != {"50", "99"}:
        raise RuntimeError(f"wrk {url}: no latency percentiles in its output:\n{out}")
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50": _ms(latency["50"]), "p99": _ms(latency["99"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--big-connections", type=int, default=2)
    args = parser.parse_args()
    wrk = find_wrk()

    from ingest.broker import DevBroker

    work = Path(tempfile.mkdtemp(prefix="custody-bench-http-"))
    origin_port, reverse_port = free_port(), free_port()
    www = work / "origin" / "www"
    www.mkdir(parents=True)
    (www / "index.html").write_text("<h1>hello from nginx</h1>\n")
    (www / "big.bin").write_bytes(os.urandom(BIG))
    origin = start_nginx(work / "origin", ORIGIN.format(port=origin_port, dir=work / "origin"), origin_port)
    reverse = start_nginx(work / "reverse", REVERSE.format(port=reverse_port, origin=origin_port,
                                                            token=UPSTREAM_TOKEN), reverse_port)
    custody, proxy_out = None, ""
    small: dict[str, dict[str, float]] = {}
    big: dict[str, dict[str, float]] = {}
    try:
        with DevBroker(log_path=work / "broker.log") as broker:
            custody, custody_port, token = start_custody(work, broker.bootstrap, origin_port)
            targets = {"direct to nginx": (origin_port, None), "nginx reverse proxy": (reverse_port, None),
                       "custody proxy": (custody_port, token)}
            for name, (port, bearer) in targets.items():
                run_wrk(wrk, f"http://127.0.0.1:{port}/index.html", 2, args.connections, bearer)  # warm up
                small[name] = run_wrk(wrk, f"http://127.0.0.1:{port}/index.html", args.seconds,
                                      args.connections, bearer)
                big[name] = run_wrk(wrk, f"http://127.0.0.1:{port}/big.bin", args.seconds,
                                    args.big_connections, bearer)
            proxy_out = stop(custody, signal.SIGINT)
    finally:
        stop(custody)
        stop(reverse, signal.SIGQUIT)
        stop(origin, signal.SIGQUIT)

    ours = small["custody proxy"]
    print(f"\nsmall GET /index.html, keep-alive, {args.connections} connections, {args.seconds} s (wrk)")
    print(f"  {'':22} {'requests/s':>11} {'p50 ms':>8} {'p99 ms':>8}")
    for name, figures in small.items():
        print(f"  {name:22} {figures['rps']:11,.0f} {figures['p50']:8.2f} {figures['p99']:8.2f}")
    for name in ("direct to nginx", "nginx reverse proxy"):
        base = small[name]
        print(f"  custody / {name}: requests/s {ours['rps'] / base['rps']:.2f}x, "
              f"p50 {ours['p50'] / base['p50']:.1f}x, p99 {ours['p99'] / base['p99']:.1f}x")
    print(f"\n1 MiB GET /big.bin, {args.big_connections} connections, {args.seconds} s (MiB/s)")
    for name, figures in big.items():
        print(f"  {name:22} {figures['rps'] * BIG / (1 << 20):9.1f} MiB/s  (p50 {figures['p50']:.1f} ms)")
    for name in ("direct to nginx", "nginx reverse proxy"):
        print(f"  custody / {name}: {big['custody proxy']['rps'] / big[name]['rps']:.2f}x")
    lines = [line for line in proxy_out.strip().splitlines() if line.startswith("recorder:")]
    print("\n" + (lines[-1] if lines else "(no recorder stats)"))


if __name__ == "__main__":
    main()
