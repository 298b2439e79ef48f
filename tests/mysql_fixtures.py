"""Helpers for the MySQL proxy tests: a database and a login of the test run's own on the machine's MariaDB
(127.0.0.1:3306, root without a password), the proxy's `[[proxy]]` entries for it, and clients."""

from __future__ import annotations

import os
import secrets
import uuid
from dataclasses import dataclass

import pymysql

ROOT = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}


def root() -> pymysql.connections.Connection:
    return pymysql.connect(**ROOT, autocommit=True)


@dataclass
class Target:
    database: str
    user: str
    password: str
    env: str

    def direct(self, **kwargs) -> pymysql.connections.Connection:
        return pymysql.connect(host="127.0.0.1", port=3306, user=self.user, password=self.password,
                               database=self.database, autocommit=True, **kwargs)

    def drop(self) -> None:
        with root() as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{self.database}`")
            cur.execute(f"DROP USER IF EXISTS '{self.user}'@'127.0.0.1'")


def make_target(plugin: str = "mysql_native_password") -> Target:
    """A fresh database and a user the proxy logs in as (its password in an environment variable)."""
    tag = uuid.uuid4().hex[:8]
    target = Target(f"custody_my_{tag}", f"custody_{tag}", secrets.token_urlsafe(12), f"CUSTODY_MY_PW_{tag.upper()}")
    os.environ[target.env] = target.password
    with root() as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{target.database}`")
        if plugin == "ed25519":
            cur.execute("INSTALL SONAME 'auth_ed25519'") if not _installed(cur, "ed25519") else None
            cur.execute(f"CREATE USER '{target.user}'@'127.0.0.1' IDENTIFIED VIA ed25519 USING PASSWORD(%s)",
                        (target.password,))
        else:
            cur.execute(f"CREATE USER '{target.user}'@'127.0.0.1' IDENTIFIED BY %s", (target.password,))
        cur.execute(f"GRANT ALL ON `{target.database}`.* TO '{target.user}'@'127.0.0.1'")
    return target


def _installed(cur, name: str) -> bool:
    cur.execute("SELECT 1 FROM information_schema.plugins WHERE plugin_name = %s AND plugin_status = 'ACTIVE'", (name,))
    return cur.fetchone() is not None


def proxy_entry(target: Target, name: str = "local-mysql", extra: str = "") -> str:
    return f"""
[[proxy]]
name = "{name}"
protocol = "mysql"
listen = "127.0.0.1:0"
upstream = "mysql://{target.user}@127.0.0.1:3306/{target.database}"
upstream_password_env = "{target.env}"
policy = "policies/default.toml"
{extra}"""
