"""A throwaway PostgreSQL cluster for a test module: initdb as the `postgres` OS user, on a free port.

Leaves the machine's 127.0.0.1:5432 untouched. With `tls`, the cluster has
`ssl = on` with the given server certificate and accepts only `hostssl`
connections (trust auth), as a production target that insists on TLS would.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ingest.broker import free_port


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


class Cluster:
    def __init__(self, *, tls: dict[str, Path] | None = None, listen: tuple[str, ...] = ("127.0.0.1",),
                 max_connections: int = 30) -> None:
        initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            pytest.skip("initdb/pg_ctl not found (PostgreSQL server binaries are needed for a second cluster)")
        try:
            self._user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("no postgres OS user to run a throwaway cluster as")
        self.initdb, self.pg_ctl = initdb, pg_ctl
        self.port = free_port()
        # Outside pytest's tmp dirs: those are 0700 root, which the postgres user cannot enter.
        self.directory = Path(tempfile.mkdtemp(prefix="custody-pg-"))
        self.data = self.directory / "data"
        self._tls = tls
        self._listen = listen
        self._max_connections = max_connections

    def _as_postgres(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True, text=True,
                              timeout=120, check=True)

    def start(self) -> "Cluster":
        os.chown(self.directory, self._user.pw_uid, self._user.pw_gid)
        self._as_postgres(self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync",
                          "-E", "UTF8", "--locale=C")
        conf = [f"port = {self.port}", f"listen_addresses = '{','.join(self._listen)}'",
                f"unix_socket_directories = '{self.directory}'", "fsync = off", f"max_connections = {self._max_connections}"]
        hba = ["local all all trust"]
        if self._tls is not None:
            for name in ("server_cert", "server_key", "ca"):
                target = self.directory / self._tls[name].name
                shutil.copy(self._tls[name], target)
                os.chown(target, self._user.pw_uid, self._user.pw_gid)
                target.chmod(0o600)
            conf += ["ssl = on", f"ssl_cert_file = '{self.directory / self._tls['server_cert'].name}'",
                     f"ssl_key_file = '{self.directory / self._tls['server_key'].name}'"]
            hba.append("hostssl all all 127.0.0.0/8 trust")
        else:
            hba.append("host all all 127.0.0.0/8 trust")
        with open(self.data / "postgresql.conf", "a") as out:
            out.write("\n".join(conf) + "\n")
        (self.data / "pg_hba.conf").write_text("\n".join(hba) + "\n")
        self._as_postgres(self.pg_ctl, "-D", str(self.data), "-l", str(self.directory / "log"), "-w", "-t", "60",
                          "start")
        return self

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run(["runuser", "-u", "postgres", "--", self.pg_ctl, "-D", str(self.data), "-m", "immediate",
                            "-w", "stop"], capture_output=True, timeout=60)
        for _ in range(20):  # the postmaster's files go with it
            try:
                shutil.rmtree(self.directory)
                return
            except OSError:
                time.sleep(0.1)
