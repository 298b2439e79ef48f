"""One system run: start the clients of every protocol against a running SystemStack, keep their logs."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ssh_fixtures import Client
from system_clients import (SessionLog, Workload, http_session, mysql_session, new_tag, pg_session, sftp_session,
                            ssh_exec_session)

IDENTITIES = [("alice@example.com", ("dba",)), ("bob@example.com", ("dev",)), ("carol@example.com", ("dba",)),
              ("dave@example.com", ("analyst",))]


@dataclass(frozen=True)
class Profile:
    seconds: float  # how long the clients run
    pg_sessions: int
    mysql_sessions: int
    http_sessions: int
    ssh_execs: int
    sftp_sessions: int
    broker_hang: float  # seconds the broker is SIGSTOPped while sessions run
    pace: float  # seconds between one client's rounds


def profile() -> Profile:
    long = os.environ.get("CUSTODY_SYSTEM", "short") == "long"
    base = (Profile(180, 50, 4, 4, 12, 4, 20, 0.2) if long else Profile(24, 12, 2, 2, 4, 2, 5, 0.15))
    env = lambda name, value: type(value)(os.environ.get(f"CUSTODY_SYSTEM_{name}", value))  # noqa: E731
    return Profile(env("SECONDS", base.seconds), env("PG_SESSIONS", base.pg_sessions), base.mysql_sessions,
                   base.http_sessions, base.ssh_execs, base.sftp_sessions, env("BROKER_HANG", base.broker_hang),
                   base.pace)


def start_workload(stack, prof, pg_table: str, mysql_target, workdir: Path) -> Workload:
    workload = Workload()
    deadline = time.time() + prof.seconds
    for i in range(prof.pg_sessions):
        who, groups = IDENTITIES[i % len(IDENTITIES)]
        workload.spawn(pg_session, SessionLog("postgres", "local-postgres", who, new_tag()), stack.ports.postgres,
                       stack.token(who, groups), pg_table, deadline, prof.pace)
    for i in range(prof.mysql_sessions):
        who, groups = IDENTITIES[i % len(IDENTITIES)]
        workload.spawn(mysql_session, SessionLog("mysql", "sys-mysql", who, new_tag()), stack.ports.mysql,
                       stack.token(who, groups), mysql_target.database, deadline, prof.pace)
    for i in range(prof.http_sessions):
        who, groups = IDENTITIES[i % len(IDENTITIES)]
        workload.spawn(http_session, SessionLog("http", "sys-web", who, new_tag()), stack.ports.http,
                       stack.token(who, groups), deadline, prof.pace)
    client = Client(workdir / "ssh-client", "127.0.0.1", stack.ports.ssh, stack.ssh_host_key)

    def ssh_sessions() -> None:
        # spread over the run, so that some are open during each fault
        total = prof.ssh_execs + prof.sftp_sessions
        for i in range(total):
            who, groups = IDENTITIES[i % len(IDENTITIES)]
            tag = new_tag()
            log = SessionLog("ssh", "sys-ssh", who, tag)
            if i < prof.ssh_execs:
                command = (f"echo {tag}; sleep 1; head -c 100000 /dev/zero | sha256sum" if i % 3 else
                           f"echo {tag}; ls / | wc -l; exit 3")
                workload.spawn(ssh_exec_session, log, client, stack.token(who, groups), command)
            else:
                workload.spawn(sftp_session, log, client, stack.token(who, groups), workdir, 200_000 + i)
            time.sleep(max(0.0, (deadline - time.time()) / max(1, total - i)) * 0.8)

    spawner = threading.Thread(target=ssh_sessions, daemon=True)
    spawner.start()
    workload.spawner = spawner
    return workload
