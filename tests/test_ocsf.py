"""OCSF rendering (issue 18): every class produced by a real session of each protocol, sealed by the real ledger
with [soc] on, read back from custody.violations.ocsf / custody.activity.ocsf and validated against the JSON
Schema compiled from the tagged OCSF release in tests/ocsf/."""

from __future__ import annotations

import json

import psycopg
import pytest

from ingest import ocsf
from ocsf_fixtures import SCHEMA_DIR, read_topic, seal, validate
from pg_fixtures import EventLog, new_app, start_proxy


def test_the_carried_schema_names_its_release():
    source = json.loads((SCHEMA_DIR / "SOURCE.json").read_text())
    assert source["tag"] == ocsf.VERSION == "1.8.0"
    assert source["commit"] == "6fa6499a0f8c9f449d342816e90e5f687c224b0a"
    assert source["classes"] == {"authentication": 3002, "detection_finding": 2004, "datastore_activity": 6005,
                                 "ssh_activity": 4007, "http_activity": 4002, "api_activity": 6003}


def test_a_document_outside_the_schema_is_refused():
    doc = {"class_uid": 3002, "category_uid": 3, "activity_id": 1, "type_uid": 300201, "time": 1, "severity_id": 1,
           "metadata": {"version": ocsf.VERSION, "product": ocsf.PRODUCT}, "user": {"name": "x"},
           "service": {"name": "t"}}
    validate(doc)
    with pytest.raises(AssertionError, match="not_an_ocsf_field"):
        validate({**doc, "not_an_ocsf_field": 1})
    with pytest.raises(AssertionError):
        validate({**doc, "activity_id": 42})


def by_session(docs: list[dict], session_id: str) -> list[dict]:
    return [d for d in docs if d["metadata"].get("correlation_uid") == session_id]


@pytest.fixture
def pg_sealed(broker, tmp_path):
    proxy = start_proxy(tmp_path / "custody", broker)
    events = EventLog.open(proxy)
    app = new_app("ocsf")
    try:
        with proxy.connect(application_name=app, autocommit=True) as conn:
            conn.execute("SELECT 1")
            with pytest.raises(psycopg.Error):
                conn.execute("DROP TABLE pg_class_does_not_matter")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proxy.dsn(password="not-a-token", application_name=app + "-bad"))
        session = events.session(app)
        failed = events.find(lambda body: body.get("identity") is None)
        total = len(session) + sum(len(s) for s in failed)
        seal(proxy.kafka, proxy.directory / "keys", tmp_path / "ledger", total, f"ocsf-{app}")
        yield proxy, session, failed
    finally:
        events.close()
        proxy.background.stop()


def test_a_datastore_transfer_names_no_table():
    """A MySQL LOAD DATA LOCAL file is a transfer whose object is the client's file: it is in the evidence link,
    never passed off as the statement's table."""
    from ingest.sessions import SessionIdentity

    who = SessionIdentity("eve", None, ["dev"], "https://idp/", "127.0.0.1:5555", "local-mysql", "mysql")
    common = dict(session_id="01900000-0000-7000-8000-000000000000", event_id="e", message_no=0, leaf=None,
                  ts_us=1_700_000_000_000_000, identity=who, attributes={"database": "shop"}, channel=None, start={})
    load = ocsf.activity(ocsf.Operation(kind="transfer", text="/tmp/orders.csv", objects=["/tmp/orders.csv"],
                                        **common), None)
    select = ocsf.activity(ocsf.Operation(kind="statement", text="SELECT * FROM orders", objects=["orders"],
                                          **common), None)
    assert "table" not in load and load["unmapped"]["custody"]["objects"] == ["/tmp/orders.csv"]
    assert select["table"] == {"name": "orders"}
    validate(load)
    validate(select)


def test_postgres_session_in_ocsf(pg_sealed):
    proxy, session, failed = pg_sealed
    sid = session[0].session_id
    activity = by_session(read_topic(proxy.kafka, "activity.ocsf"), sid)
    findings = read_topic(proxy.kafka, "violations.ocsf")
    for doc in activity + findings:
        validate(doc)
    logon = [d for d in activity if d["class_uid"] == 3002]
    assert len(logon) == 1 and logon[0]["status_id"] == 1 and logon[0]["user"]["uid"] == "alice@example.com"
    assert logon[0]["src_endpoint"]["ip"] == "127.0.0.1" and logon[0]["dst_endpoint"]["svc_name"] == "postgres"
    statements = {d["query_info"]["query_string"]: d for d in activity if d["class_uid"] == 6005}
    select = statements["SELECT 1"]
    assert select["activity_id"] == 1 and select["status_id"] == 1 and select["database"]["type"] == "PostgreSQL"
    assert select["actor"]["user"]["uid"] == "alice@example.com" and select["actor"]["session"]["uid"] == sid
    link = select["unmapped"]["custody"]
    assert link["session_id"] == sid and link["event_id"] in {e.event_id for e in session}
    assert link["ledger"]["origin"] == "custody.test/ledger" and link["ledger"]["checkpoint_size"] > link["leaf_index"]
    drop = statements["DROP TABLE pg_class_does_not_matter"]
    assert drop["status_id"] == 2 and drop["action_id"] == 2 and drop["disposition_id"] == 2
    assert drop["unmapped"]["custody"]["policy"]["action"] == "block"

    block = [d for d in by_session(findings, sid) if d["class_uid"] == 2004]
    assert len(block) == 1
    assert block[0]["finding_info"]["analytic"]["type"] == "Rule"
    assert block[0]["evidences"][0]["data"]["statement"] == "DROP TABLE pg_class_does_not_matter"
    assert block[0]["evidences"][0]["database"]["type"] == "PostgreSQL"
    assert block[0]["finding_info"]["related_events"][0]["uid"] in {e.event_id for e in session}
    bad = [d for s in failed for d in by_session(findings, s[0].session_id)]
    assert bad and all(d["class_uid"] == 3002 and d["status_id"] == 2 for d in bad)
    assert bad[0]["status_code"] and bad[0]["user"]["name"] == "alice@example.com"
    assert len({d["metadata"]["uid"] for d in activity + findings}) == len(activity + findings), "ids are unique"


def test_an_operation_open_across_a_ledger_restart_is_rendered_with_its_session(broker, tmp_path):
    """The renderer's state is kept in each seal's state snapshot: a statement whose start was sealed before the
    ledger stopped, and whose outcome comes after it restarted, is rendered once, still with the session's
    database and protocol user (the SessionStart attributes, sealed before the restart)."""
    import threading
    import time

    proxy = start_proxy(tmp_path / "custody", broker)
    events = EventLog.open(proxy)
    app = new_app("restart")
    keys, ledger, group = proxy.directory / "keys", tmp_path / "ledger", f"ocsf-{app}"
    sleep = "SELECT pg_sleep(8)"  # outlasts the first (pinned) ledger run, which takes 1-3 s
    try:
        conn = proxy.connect(application_name=app, autocommit=True)
        running = threading.Thread(target=conn.execute, args=(sleep,))
        running.start()
        deadline = time.monotonic() + 10
        while not any(m.get("text") == sleep for s in events.sessions.values() for e in s if e.kind == "frames"
                      for m in e.body["messages"]):
            assert time.monotonic() < deadline, "the statement was not recorded"
            events.poll(0.2)
        seal(proxy.kafka, keys, ledger, 1, group)  # everything so far sealed, the statement still running; stopped
        assert running.is_alive(), "the statement ended before the first ledger stopped"
        before = read_topic(proxy.kafka, "activity.ocsf")
        running.join(30)
        conn.close()
        session = events.session(app)
        seal(proxy.kafka, keys, ledger, len(session), group)  # a new ledger, resumed from the snapshot
    finally:
        events.close()
        proxy.background.stop()
    sid = session[0].session_id
    after = by_session(read_topic(proxy.kafka, "activity.ocsf"), sid)
    assert not [d for d in by_session(before, sid) if d["class_uid"] == 6005 and d["query_info"]["query_string"] == sleep]
    [doc] = [d for d in after if d["class_uid"] == 6005 and d["query_info"]["query_string"] == sleep]
    validate(doc)
    assert doc["status_id"] == 1 and doc["database"]["name"] == "postgres"
    assert doc["actor"]["user"]["account"]["name"] == "alice@example.com"
    assert doc["unmapped"]["custody"]["ledger"]["seal"] > 1 and doc["duration"] >= 3000
