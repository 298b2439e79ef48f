"""Debian's nginx as a real third-party HTTP upstream, started on a free loopback port with its own
config, files and logs in a temporary directory (`./dev test` installs nginx when it is missing).

It serves static files from `root`, a small JSON document at `/api/user` (with values the masking
detectors find), a JSON `/api/config` with a `password` field, echoes request facts at `/echo`
(method, the Authorization it received — so tests can see what credential reached the target), and
chunked responses (`/chunked/`: SSI output has no length, so nginx sends it chunked).

Options, each off by default: `tls` (the `make_tls` files of pg_fixtures: an https listener with that
server certificate), `client_ca` (with tls: `ssl_verify_client on` against that CA, so a request without
a client certificate it signed gets nginx's 400), and `websocket` (`host:port` of a WebSocket app that
`/ws/` is reverse-proxied to with the Upgrade and Connection headers passed on, as nginx's documentation
configures it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Mapping

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
USER_JSON = ('{"id":1,"name":"Ada","email":"ada.lovelace@example.org",'
             '"card":"4111 1111 1111 1111","note":"nothing secret"}')
CONFIG_JSON = '{"service":"orders","password":"hunter2-secret","replicas":3}'

CONFIG = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    default_type application/octet-stream;
    types {{ text/html html; text/plain txt; application/json json; }}
    keepalive_requests 10000;
    server {{
        listen 127.0.0.1:{port}{ssl};
        root {dir}/www;
{options}        location = /api/user {{ default_type application/json; return 200 '{user}'; }}
        location = /api/config {{ default_type application/json; return 200 '{config}'; }}
        location = /echo {{
            default_type application/json;
            return 200 '{{"method":"$request_method","uri":"$request_uri","authorization":"$http_authorization","host":"$host","length":"$content_length"}}';
        }}
        location /chunked/ {{ ssi on; }}
        location = /upload {{ client_max_body_size 10m; client_body_buffer_size 10m; return 200 'got $content_length bytes'; }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TLS = """\
        ssl_certificate {cert};
        ssl_certificate_key {key};
"""
CLIENT_CA = """\
        ssl_client_certificate {ca};
        ssl_verify_client on;
"""
WEBSOCKET = """\
        location /ws/ {{
            proxy_pass http://{app};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 60s;
        }}
"""


class Nginx:
    def __init__(self, directory: Path, tls: Mapping[str, Path] | None = None, client_ca: Path | None = None,
                 websocket: str | None = None) -> None:
        if client_ca is not None and tls is None:
            raise ValueError("client_ca needs tls")
        self.dir = directory
        self.port = free_port()
        self.tls, self.client_ca, self.websocket = tls, client_ca, websocket
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _options(self) -> str:
        """The server block's lines for the options set (none: the plain http server it always was)."""
        options = ""
        if self.tls is not None:
            options += TLS.format(cert=self.tls["server_cert"], key=self.tls["server_key"])
        if self.client_ca is not None:
            options += CLIENT_CA.format(ca=self.client_ca)
        if self.websocket is not None:
            options += WEBSOCKET.format(app=self.websocket)
        return options

    def __enter__(self) -> "Nginx":
        www = self.dir / "www"
        (www / "chunked").mkdir(parents=True, exist_ok=True)
        (www / "index.html").write_text("<h1>hello from nginx</h1>\n")
        (www / "big.bin").write_bytes(os.urandom(3 << 20))
        (www / "chunked" / "page.html").write_text(
            '<p>start</p><!--# echo var="date_local" --><p>' + "x" * 5000 + "</p>\n")
        config = self.dir / "nginx.conf"
        config.write_text(CONFIG.format(dir=self.dir, port=self.port, user=USER_JSON, config=CONFIG_JSON,
                                        ssl=" ssl" if self.tls else "", options=self._options()))
        self.process = subprocess.Popen([NGINX, "-c", str(config), "-p", str(self.dir)],
                                        stdout=subprocess.DEVNULL, stderr=open(self.dir / "stderr.log", "wb"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"nginx exited: {(self.dir / 'stderr.log').read_text()}"
                                       f"{(self.dir / 'error.log').read_text() if (self.dir / 'error.log').exists() else ''}")
                time.sleep(0.05)
        raise RuntimeError("nginx did not start listening")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
