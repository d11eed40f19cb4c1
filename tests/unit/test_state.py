"""The durable state file (SQLite): survives a reopen, decides a review exactly once, refuses junk."""

import sqlite3
import threading

import pytest

from services.control.state import (
    SCHEMA_VERSION,
    FeedbackExistsError,
    ReviewDecidedError,
    ReviewNotFoundError,
    StateError,
    StateStore,
    UnknownRequestError,
)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "nested" / "dir" / "state.sqlite"  # parents are created


def _record(store, rid, domain="math", now=1.0, confidence=0.9):
    store.record_request(
        rid,
        domain=domain,
        tier="low",
        strategy="cot",
        exit_reason="confidence",
        confidence=confidence,
        rounds=2,
        completion_tokens=10,
        now=now,
    )


def _review(store, rid="v1", now=4.0):
    return store.create_review(
        rid,
        request_id="chatcmpl-" + rid,
        tier="critical",
        domain="medical",
        proposed={"content": "x", "n": [1, 2]},
        completion={"id": rid},
        now=now,
    )


def test_round_trips(path):
    s = StateStore(path)
    s.save_checkpoint("budgets", {"a": [1, 2.5, None]}, now=1.0)
    s.save_checkpoint("budgets", {"b": 1}, now=2.0)  # overwrites
    assert s.load_checkpoint("budgets") == {"b": 1} and s.load_checkpoint("nope") is None
    _record(s, "r1", confidence=None)
    req = s.get_request("r1")
    assert req["domain"] == "math" and req["confidence"] is None and req["rounds"] == 2
    assert s.get_request("nope") is None
    s.set_threshold("math", 0.8, source="config", now=1.0)
    s.set_threshold("math", 0.85, source="feedback", now=3.0)
    assert s.thresholds() == {"math": {"value": 0.85, "source": "feedback", "updated_at": 3.0}}
    with pytest.raises(ValueError):
        s.set_threshold("math", 1.5, source="x", now=3.0)
    review = _review(s)
    assert review == {
        "id": "v1",
        "request_id": "chatcmpl-v1",
        "tier": "critical",
        "domain": "medical",
        "status": "pending",
        "created_at": 4.0,
        "decided_at": None,
        "reviewer": None,
        "note": None,
        "proposed": {"content": "x", "n": [1, 2]},
        "completion": {"id": "v1"},
    }
    assert _review(s, now=9.0) == review  # a retried create returns the same review
    with pytest.raises(StateError, match="another request"):
        s.create_review(
            "v1", request_id="other", tier="critical", domain="m", proposed={}, completion={}, now=5.0
        )


def test_everything_survives_a_reopen(path):
    s = StateStore(path)
    s.save_checkpoint("budgets", {"sessions": {"a": 1}}, 1.0)
    _record(s, "r1")
    s.add_feedback("r1", True, 2.0)
    s.set_threshold("math", 0.85, source="feedback", now=3.0)
    _review(s, "v1")
    _review(s, "v2", now=5.0)
    s.decide_review("v2", approve=False, reviewer="dr", note="wrong dose", now=6.0)
    s.close()
    t = StateStore(path)
    assert t.load_checkpoint("budgets") == {"sessions": {"a": 1}}
    assert t.get_request("r1")["exit_reason"] == "confidence"
    assert [f["correct"] for f in t.domain_feedback("math")] == [True]
    with pytest.raises(FeedbackExistsError):
        t.add_feedback("r1", False, 7.0)
    assert t.thresholds()["math"]["value"] == 0.85
    assert t.get_review("v1")["status"] == "pending"
    v2 = t.get_review("v2")
    assert (v2["status"], v2["reviewer"], v2["note"]) == ("rejected", "dr", "wrong dose")
    assert v2["decided_at"] == 6.0
    assert [r["id"] for r in t.list_reviews()] == ["v2", "v1"]  # newest first
    assert [r["id"] for r in t.list_reviews("pending")] == ["v1"]
    assert [r["id"] for r in t.list_reviews(limit=1)] == ["v2"]
    with pytest.raises(StateError, match="unknown review status"):
        t.list_reviews("maybe")


def test_feedback_needs_a_request_is_once_only_and_outlives_retention(path):
    s = StateStore(path)
    with pytest.raises(UnknownRequestError, match="nope"):
        s.add_feedback("nope", True, 1.0)
    _record(s, "r1", now=1.0, confidence=0.7)
    _record(s, "r2", now=2.0, confidence=0.95)
    _record(s, "r3", domain="code", now=2.0)
    row = s.add_feedback("r1", False, 3.0)
    assert row == {
        "request_id": "r1",
        "domain": "math",
        "tier": "low",
        "confidence": 0.7,
        "exit_reason": "confidence",
        "rounds": 2,
        "correct": False,
        "given_at": 3.0,
    }
    with pytest.raises(FeedbackExistsError, match="once per request"):
        s.add_feedback("r1", True, 4.0)
    s.add_feedback("r2", True, 5.0)
    fb = s.domain_feedback("math")
    assert [(f["request_id"], f["confidence"], f["correct"]) for f in fb] == [
        ("r2", 0.95, True),
        ("r1", 0.7, False),
    ]
    assert len(s.domain_feedback("math", limit=1)) == 1 and s.domain_feedback("code") == []
    assert s.prune_requests(older_than=1.5) == 1
    assert s.get_request("r1") is None and s.get_request("r2") is not None
    assert len(s.domain_feedback("math")) == 2  # calibration history is kept
    with pytest.raises(UnknownRequestError):
        s.add_feedback("r1", True, 6.0)


def test_decide_twice_and_unknown_ids(path):
    s = StateStore(path)
    _review(s, "v")
    assert s.get_review("missing") is None
    out = s.decide_review("v", approve=True, reviewer="dr", note=None, now=5.0)
    assert out["status"] == "approved" and out["decided_at"] == 5.0
    with pytest.raises(ReviewDecidedError, match="already approved"):
        s.decide_review("v", approve=False, reviewer="other", note=None, now=6.0)
    assert s.get_review("v")["reviewer"] == "dr"  # the losing decision changed nothing
    with pytest.raises(ReviewNotFoundError, match="missing"):
        s.decide_review("missing", approve=True, reviewer=None, note=None, now=3)


def test_a_review_is_decided_exactly_once_even_under_races(path):
    s = StateStore(path)
    _review(s, "v")
    wins, losses = [], []
    start = threading.Barrier(8)

    def decide(i):
        start.wait()
        try:
            wins.append(s.decide_review("v", approve=i % 2 == 0, reviewer=f"r{i}", note=None, now=2))
        except ReviewDecidedError as exc:
            losses.append(str(exc))

    threads = [threading.Thread(target=decide, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 7
    assert all(wins[0]["status"] in msg for msg in losses)
    assert s.get_review("v")["reviewer"] == wins[0]["reviewer"]


def test_a_file_that_is_not_a_state_file_is_refused_clearly(tmp_path):
    bad = tmp_path / "junk.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="not a usable Ponder state file"):
        StateStore(bad)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(StateError, match="not a Ponder state file"):
        StateStore(other)


def test_a_newer_schema_is_refused(path):
    StateStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(StateError, match="newer than this Ponder"):
        StateStore(path)


def _open_and_write(path: str, barrier, domain: str) -> None:
    barrier.wait()  # both open the file at the same moment, as the two control actors do
    StateStore(path).set_threshold(domain, 0.5, source="test", now=1.0)


def test_two_processes_opening_a_new_state_file_at_once_both_succeed(tmp_path):
    """Depth control and the records actor open the file together at start-up. Without taking turns,
    SQLite refuses one connection's WAL switch at once (no busy wait): 11 of 40 such races failed."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for attempt in range(20):
        path, barrier = tmp_path / f"state-{attempt}.sqlite", ctx.Barrier(2)
        procs = [ctx.Process(target=_open_and_write, args=(str(path), barrier, f"d{i}")) for i in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert [p.exitcode for p in procs] == [0, 0], f"attempt {attempt}"
        assert set(StateStore(path).thresholds()) == {"d0", "d1"}
