"""One system run: start the clients of every protocol against a running SystemStack, keep their logs."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Callable

from ssh_fixtures import Client
from system_clients import (SessionLog, Workload, http_session, kubectl_session, mysql_session, new_tag, pg_session,
                            sftp_session, ssh_exec_session)

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
    kubectl_runs: int
    broker_hang: float  # seconds the broker is SIGSTOPped while sessions run
    pace: float  # seconds between one client's rounds


def profile() -> Profile:
    long = os.environ.get("CUSTODY_SYSTEM", "short") == "long"
    base = (Profile(180, 50, 4, 4, 12, 4, 9, 20, 0.2) if long else Profile(24, 12, 2, 2, 4, 2, 4, 5, 0.15))
    env = lambda name, value: type(value)(os.environ.get(f"CUSTODY_SYSTEM_{name}", value))  # noqa: E731
    return Profile(env("SECONDS", base.seconds), env("PG_SESSIONS", base.pg_sessions), base.mysql_sessions,
                   base.http_sessions, base.ssh_execs, base.sftp_sessions, base.kubectl_runs,
                   env("BROKER_HANG", base.broker_hang), base.pace)


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
    ssh = [ssh_job(i, prof, stack, client, workdir) for i in range(prof.ssh_execs + prof.sftp_sessions)]
    kubeconfig = stack.kubeconfig() if prof.kubectl_runs else None
    kube = [kubectl_job(i, stack, kubeconfig, workdir / "kubectl") for i in range(prof.kubectl_runs)]
    jobs = [job for pair in zip_longest(ssh, kube) for job in pair if job is not None]

    def spread() -> None:
        # spread over the run, so that some are open during each fault
        for i, job in enumerate(jobs):
            job(workload)
            time.sleep(max(0.0, (deadline - time.time()) / max(1, len(jobs) - i)) * 0.8)

    spawner = threading.Thread(target=spread, daemon=True)
    spawner.start()
    workload.spawner = spawner
    return workload


def ssh_job(i: int, prof: Profile, stack, client: Client, workdir: Path) -> Callable[[Workload], None]:
    """The i-th SSH session: an exec (some exit 3) or an sftp upload, download and remove."""
    who, groups = IDENTITIES[i % len(IDENTITIES)]
    tag = new_tag()
    log = SessionLog("ssh", "sys-ssh", who, tag)
    if i < prof.ssh_execs:
        command = (f"echo {tag}; sleep 1; head -c 100000 /dev/zero | sha256sum" if i % 3 else
                   f"echo {tag}; ls / | wc -l; exit 3")
        return lambda workload: workload.spawn(ssh_exec_session, log, client, stack.token(who, groups), command)
    return lambda workload: workload.spawn(sftp_session, log, client, stack.token(who, groups), workdir,
                                           200_000 + i)


def kubectl_job(i: int, stack, kubeconfig: Path, workdir: Path) -> Callable[[Workload], None]:
    """The i-th kubectl run, each logged in with a token of its own: list pods (a cold discovery first), exec (a
    connection more), get a Secret, or list pods in a namespace the cluster does not have (404)."""
    who, groups = IDENTITIES[i % len(IDENTITIES)]
    log = SessionLog("kubernetes", "sys-kube", who, new_tag())
    home = workdir / log.tag
    home.mkdir(parents=True)
    log.token_id = stack.login(who, groups, home / "tokens.json")
    kind = i % 4
    if kind == 1:
        stream = SessionLog("kubernetes", "sys-kube", who, new_tag())
        meaning = {"verb": "exec", "resource": "pods", "namespace": "default", "name": "web-1"}
        args = ["exec", "web-1", "--", "echo", stream.tag]
        return lambda workload: workload.spawn(kubectl_session, log, kubeconfig, home, args, meaning, stream,
                                               companions=(stream,))
    args, meaning = {
        0: (["get", "pods"], {"verb": "list", "resource": "pods", "namespace": "default"}),
        2: (["get", "secret", "db-creds"], {"verb": "get", "resource": "secrets", "namespace": "default",
                                            "name": "db-creds"}),
        3: (["get", "pods", "-n", log.tag], {"verb": "list", "resource": "pods", "namespace": log.tag}),
    }[kind]
    return lambda workload: workload.spawn(kubectl_session, log, kubeconfig, home, args, meaning)
