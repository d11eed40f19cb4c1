"""The durable state file (SQLite): survives a reopen, decides a review exactly once, refuses junk."""

import threading

import pytest

from services.state import (
    FeedbackExistsError,
    ReviewDecidedError,
    ReviewNotFoundError,
    StateError,
    StateStore,
    UnknownRequestError,
)


def _record(store, rid, domain="math", now=1.0):
    store.record_request(rid, domain=domain, tier="low", strategy="cot", exit_reason="confidence",
                         confidence=0.9, rounds=1, completion_tokens=10, now=now)


def test_everything_survives_a_reopen(tmp_path):
    s = StateStore(tmp_path / "s.sqlite")
    s.save_checkpoint("budgets", {"sessions": {"a": 1}}, 1.0)
    _record(s, "r1")
    s.add_feedback("r1", True, 2.0)
    s.set_threshold("math", 0.85, source="feedback", now=3.0)
    s.create_review("v1", request_id="r2", tier="critical", domain="medical", proposed={"content": "x"},
                    completion={"id": "r2"}, now=4.0)
    s.close()
    t = StateStore(tmp_path / "s.sqlite")
    assert t.load_checkpoint("budgets") == {"sessions": {"a": 1}} and t.load_checkpoint("nope") is None
    assert t.domain_feedback("math")[0]["correct"] is True
    assert t.thresholds()["math"]["value"] == 0.85
    review = t.get_review("v1")
    assert review["status"] == "pending" and review["proposed"] == {"content": "x"}


def test_feedback_needs_a_request_and_is_once_only(tmp_path):
    s = StateStore(tmp_path / "s.sqlite")
    with pytest.raises(UnknownRequestError, match="nope"):
        s.add_feedback("nope", True, 1.0)
    _record(s, "r1")
    assert s.add_feedback("r1", False, 2.0)["domain"] == "math"
    with pytest.raises(FeedbackExistsError):
        s.add_feedback("r1", True, 3.0)
    _record(s, "old", now=0.5)
    assert s.prune_requests(older_than=0.9) == 1 and s.get_request("old") is None


def test_a_review_is_decided_exactly_once_even_under_races(tmp_path):
    s = StateStore(tmp_path / "s.sqlite")
    s.create_review("v", request_id="r", tier="critical", domain="legal", proposed={}, completion={}, now=1)
    wins, losses = [], []

    def decide(i):
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
    assert wins[0]["status"] in losses[0]
    with pytest.raises(ReviewNotFoundError):
        s.decide_review("missing", approve=True, reviewer=None, note=None, now=3)
    assert [r["id"] for r in s.list_reviews("pending")] == []
    assert [r["id"] for r in s.list_reviews()] == ["v"]


def test_a_file_that_is_not_a_state_file_is_refused_clearly(tmp_path):
    bad = tmp_path / "s.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="not a usable Ponder state file"):
        StateStore(bad)
