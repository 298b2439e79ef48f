"""Adaptive batching: what waits together is folded, per session, in order, within bounds."""

from __future__ import annotations

from ingest.batching import fold


def frames(direction: str, *names: str) -> dict:
    return {"direction": direction, "messages": [{"type": n, "data": n.encode()} for n in names]}


def test_a_lone_event_is_written_as_it_is():
    body = frames("client", "Query")
    assert fold([("s", "frames", body, 100)]) == [("s", "frames", body, 100)]


def test_both_directions_fold_into_one_mixed_event_with_offsets():
    [(session, kind, body, ts)] = fold([("s", "frames", frames("client", "Query"), 100),
                                        ("s", "frames", frames("server", "RowDescription", "DataRow"), 130)])
    assert (session, kind, ts, body["direction"]) == ("s", "frames", 100, "mixed")
    assert [(m["type"], m["direction"], m.get("offset_us")) for m in body["messages"]] == [
        ("Query", "client", None), ("RowDescription", "server", 30), ("DataRow", "server", 30)]


def test_one_direction_stays_that_direction():
    [(_, _, body, _)] = fold([("s", "frames", frames("server", "a"), 1), ("s", "frames", frames("server", "b"), 2)])
    assert body["direction"] == "server" and all("direction" not in m for m in body["messages"])


def test_another_kind_ends_the_run_and_sessions_fold_apart():
    items = [("a", "frames", frames("client", "1"), 1), ("b", "frames", frames("client", "x"), 2),
             ("a", "frames", frames("client", "2"), 3), ("a", "policy_decision", {}, 4),
             ("a", "frames", frames("client", "3"), 5), ("b", "frames", frames("client", "y"), 6)]
    out = fold(items)
    assert [(s, k, [m["type"] for m in b.get("messages", [])]) for s, k, b, _ in out] == [
        ("a", "frames", ["1", "2"]), ("b", "frames", ["x", "y"]), ("a", "policy_decision", []),
        ("a", "frames", ["3"])]


def test_bounds_in_messages_and_bytes():
    items = [("s", "frames", frames("client", "m"), i) for i in range(10)]
    assert [len(b["messages"]) for _, _, b, _ in fold(items, max_messages=4)] == [4, 4, 2]
    assert [len(b["messages"]) for _, _, b, _ in fold(items, max_bytes=3)] == [3, 3, 3, 1]
