"""Fixtures of the system tests (marker `system`): the targets of every protocol, started once per module.

A module of its own, not `conftest.py`: a second `conftest` module would shadow `tests/conftest.py` for the
`from conftest import …` of the other test files.

The whole stack through `custody up` with real clients of every protocol.

The short form runs in `./dev test`; the long form (50 PostgreSQL sessions for minutes, a 20 s broker hang) with
`CUSTODY_SYSTEM=long ./dev test tests/system` (or `-m system`). Sizes can be set one by one: CUSTODY_SYSTEM_SECONDS,
CUSTODY_SYSTEM_PG_SESSIONS, CUSTODY_SYSTEM_BROKER_HANG.
"""

from __future__ import annotations

import os
import uuid

import psycopg
import pytest

from mysql_fixtures import make_target, root
from nginx_server import Nginx
from pg_fixtures import DIRECT
from ssh_fixtures import start_sshd


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    with Nginx(tmp_path_factory.mktemp("nginx")) as server:
        yield server


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mysql_target():
    target = make_target()
    with root() as conn, conn.cursor() as cur:
        cur.execute(f"CREATE TABLE `{target.database}`.items (id INT AUTO_INCREMENT PRIMARY KEY, "
                    f"tag VARCHAR(40), n INT)")
    yield target
    target.drop()


@pytest.fixture(scope="module")
def pg_table():
    table = f"sys_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(DIRECT, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id serial PRIMARY KEY, who text, tag text, n int, note text)")
        conn.execute(f"GRANT ALL ON {table}, {table}_id_seq TO PUBLIC")
    yield table
    with psycopg.connect(DIRECT, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
