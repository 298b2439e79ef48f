"""The whole system under load and faults: concurrent PostgreSQL sessions of several identities, MySQL, HTTP,
SSH exec/sftp and kubectl (get, exec; through `custody kubeconfig`'s exec credential plugin) through `custody up`
with two ledger workers in one consumer group and its witness; a ledger worker SIGKILLed and restarted and the
broker hung (SIGSTOP/SIGCONT) while sessions run. At the end the clients' own logs are compared with `custody
activity` / `custody sql` over the sealed ledger, `custody verify` must be clean, and a bundle of the whole run must
verify with the witness's cosignature on every partition's newest checkpoint (`custody bundle verify --witnesses 1`).

A broker hang longer than a producer's delivery timeout (the long form's 20 s; ingest.kafka's producers give up
after 15 s): kafka-python's idempotent producer whose batches expired loses its producer id and sends nothing
more. The ledger replaces its publisher of seals and documents (tests/test_ledger_broker_hang.py) and the proxies'
spool drainer drops a failed producer whatever its close says (tests/test_producer_hang.py: before, the close
raised, the drainer thread died and 68 of 85 sessions were never sealed). The new producers send again what the
broker had already taken: those copies are quarantined as duplicates, never sealed twice; the checker requires
each to be a copy of an event sealed exactly once and reports their number. Measured in one long-form run (50
PostgreSQL sessions, 90 s, 20 s hang): 85 sessions and 31,717 client operations, all sealed once and in order,
verify clean, 52 re-deliveries quarantined, sealed 1.8 s after the clients ended."""

from __future__ import annotations

import json
import os
import resource
import signal
import time
from pathlib import Path

import pytest

import system_forgery
from kube_fixtures import kube, tls  # noqa: F401 - fixtures this module uses
from system_checker import check, count_by, witnessed
from system_fixtures import mysql_target, nginx, pg_table, sshd  # noqa: F401 - fixtures this module uses
from system_run import profile, start_workload
from system_stack import SystemStack, wait_for

pytestmark = pytest.mark.system


def sealed_closed(stack: SystemStack) -> int:
    return stack.sealed_query("SELECT count(*) FROM sessions WHERE ended IS NOT NULL")[0][0] if (
        stack.ledger_dir / "seals").is_dir() else 0


def test_every_client_operation_is_sealed_once_in_order_through_faults(tmp_path, nginx, sshd, mysql_target,
                                                                        pg_table, kube, tls):
    prof = profile()
    faults = os.environ.get("CUSTODY_SYSTEM_FAULTS", "1") != "0"  # 0: the same run without faults (a baseline)
    stack = SystemStack(tmp_path, mysql_target, nginx, sshd, kube, tls).start()
    figures: dict[str, object] = {}
    try:
        stack.start_worker("w1")
        workload = start_workload(stack, prof, pg_table, mysql_target, tmp_path)
        t0 = time.monotonic()
        at = lambda fraction: time.sleep(max(0.0, prof.seconds * fraction - (time.monotonic() - t0)))  # noqa: E731

        # Fault 1: SIGKILL the second ledger worker once it owns partitions; the first takes them over (once the
        # dead member's session times out: ledger.service.GROUP_SESSION_MS); the restarted one (same static member
        # id) then resumes their chains from the seals the first wrote.
        assert wait_for(lambda: stack.owned("w1"), 30), stack.tail(stack.worker_log("w1").name)
        forged = None
        at(0.25)
        if not faults:
            at(1.0)
        else:
            killed_owned = stack.owned("w1")
            figures["w1 owned when killed"] = sorted(killed_owned)
            mark = stack.up_log_size()
            stack.kill_worker("w1")
            assert wait_for(lambda: killed_owned <= stack.resumed_by_up(mark), 60), \
                f"the first worker never took over {sorted(killed_owned)}\n{stack.tail('up.log')}"
            figures["taken over"] = sorted(stack.resumed_by_up(mark))
            stack.start_worker("w1")
            assert wait_for(lambda: stack.owned("w1"), 60), "the restarted worker never took partitions back"
            figures["w1 resumed"] = sorted(stack.owned("w1"))

            # Forgery and replay, written into custody.events while sessions run.
            at(0.4)
            forged = system_forgery.inject(stack)

            # Fault 2: hang the broker (SIGSTOP) while sessions run; SIGCONT after prof.broker_hang seconds.
            at(0.5)
            tansu = stack.broker_pid()
            os.kill(tansu, signal.SIGSTOP)
            try:
                time.sleep(prof.broker_hang)
            finally:
                os.kill(tansu, signal.SIGCONT)
            figures["broker hung s"] = prof.broker_hang

        workload.spawner.join(prof.seconds + 60)
        running = workload.join(prof.seconds + 120)
        assert not running, f"clients still running: {[log.tag for log in running]}"
        failed = [(log.tag, log.failure) for log in workload.logs if log.failure]
        assert not failed, failed
        figures["clients s"] = round(time.monotonic() - t0, 1)
        clients_done = time.monotonic()

        # every session's SessionEnd sealed: then all of its events are (one partition per session, in order)
        assert stack.wait_sealed(lambda: sealed_closed(stack) >= len(workload.logs), 180), \
            f"{sealed_closed(stack)}/{len(workload.logs)} sessions sealed closed\n{stack.tail('up.log')}"
        figures["sealed s after the clients ended"] = round(time.monotonic() - clients_done, 1)
        quarantined = system_forgery.quarantine_documents(stack)
        quarantine = system_forgery.by_reason(quarantined)
        # the witness cosigns each seal it reads on custody.seals and the ledger keeps what it publishes back: wait
        # for the newest seals' cosignatures (asserted after the stop, through a bundle of the run)
        witness_wait = time.monotonic()
        wait_for(lambda: not stack.unwitnessed(), 30)
        figures["witness caught up s"] = round(time.monotonic() - witness_wait, 1)
    finally:
        up_code, worker_codes = stack.stop()
    stopped = {"up": up_code, **worker_codes}  # asserted after the checker, so that a failed stop still shows it
    recorder = [line for line in stack.tail("up.log", 1 << 30).splitlines() if "proxy | recorder:" in line]
    figures["recorder"] = recorder[-1].split("recorder: ")[1] if recorder else None

    report = check(stack, workload.logs)
    cpu, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    witness_problems, witness_figures = witnessed(stack, tmp_path)
    report.problems += witness_problems
    report.figures.update(witness_figures)
    spent = resource.getrusage(resource.RUSAGE_CHILDREN)
    report.figures["bundle export + verify s (wall, cpu)"] = (
        round(time.monotonic() - wall, 1), round(spent.ru_utime + spent.ru_stime - cpu.ru_utime - cpu.ru_stime, 1))
    report.figures.update(figures, sessions=dict(count_by(workload.logs)), quarantine=quarantine)
    report.figures["client operations/s"] = round(report.figures["client_operations"] / figures["clients s"], 1)
    if faults:
        report.problems += system_forgery.check(stack, forged, quarantined)
        report.figures["re-deliveries quarantined as duplicates"] = (
            quarantine.get("replay", 0) - system_forgery.EXPECTED["replay"])
        tampered = system_forgery.tamper_checks(stack, tmp_path)
        report.figures["tampered"] = tampered
        for what, outcome in tampered.items():
            if not outcome.startswith("exit 1") or "INVALID" not in outcome:
                report.problem(f"verify missed the tampered {what}: {outcome}")
    elif quarantine:
        report.problem(f"quarantine violations without forgeries: {quarantine}")
    if stopped != {"up": 0, "w1": 0}:
        errors = [line for line in stack.tail(stack.worker_log("w1").name, 1 << 30).splitlines()
                  if "Error" in line and "DEBUG" not in line]
        report.problem(f"exit codes on SIGTERM {stopped}; w1: {errors[-3:]}")
    print(report)
    if out := os.environ.get("CUSTODY_SYSTEM_FIGURES"):
        Path(out).write_text(json.dumps({"faults": faults, "profile": prof.__dict__, "problems": report.problems,
                                         **report.figures}, indent=1, default=str))
    assert not report.problems, str(report)
