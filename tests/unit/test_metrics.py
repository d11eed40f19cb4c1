"""The router's metric observations (services/ingress/metrics.py), with a recording fake of Ray's metrics."""

from collections import defaultdict

from services.ingress.metrics import SPECS, Recorder
from services.loop.orchestrator import Outcome
from services.reasoning.loop import RoundRecord
from services.reasoning.tiers import Action, Reason, RoundPlan, Verdict


class Fake:
    def __init__(self, kind, name, description, tag_keys, boundaries):
        self.kind, self.name, self.tag_keys = kind, name, tag_keys
        self.values = defaultdict(list)

    def _add(self, value, tags):
        assert set(tags) == set(self.tag_keys), (self.name, tags)  # every label, and only those
        self.values[tuple(sorted(tags.items()))].append(value)

    inc = observe = set = _add


def rec(i, completion, cached=0, loaded=0, confidence=0.9):
    return RoundRecord(
        index=i,
        text="t",
        prompt_tokens=100 + i,
        completion_tokens=completion,
        cached_tokens=cached,
        confidence=confidence,
        latency_ms=250.0,
        ttft_ms=40.0,
        decided_by="depth_control",
        kv_loaded_tokens=loaded,
    )


def total(m, **tags):
    want = set(tags.items())
    return sum(sum(v) for k, v in m.values.items() if want <= set(k))


def test_a_three_round_request_moves_every_series_by_its_amounts():
    r = Recorder(Fake)
    plan = RoundPlan("medium", 1, 4, 0.8)
    rounds = [
        rec(0, 30),
        rec(1, 20, cached=96, loaded=64),
        rec(2, 10, cached=160, loaded=32, confidence=0.95),
    ]
    verdicts = [Verdict(Action.CONTINUE, Reason.BELOW_THRESHOLD)] * 2 + [
        Verdict(Action.EXIT, Reason.CONFIDENCE)
    ]
    for rd, v in zip(rounds, verdicts, strict=True):
        r.round("medium", rd, v, v.exit)
    why = ["deep_sessions 3/2", "tokens_per_minute 1200/1000 for key k-3f2a"]  # as admission words them
    r.request(Outcome(plan, rounds, Reason.CONFIDENCE, "a", "r"), "medium", "cot", "ok", why)
    m = r.m
    assert total(m["ponder_round_tokens"], kind="completion") == 60
    assert total(m["ponder_round_tokens"], kind="reasoning") == 50  # all but the final round's
    assert total(m["ponder_round_tokens"], kind="prompt") == 303
    assert total(m["ponder_round_tokens"], kind="kv_loaded") == 96
    assert total(m["ponder_round_tokens"], kind="kv_cached") == 32 + 128
    assert len(m["ponder_round_latency_seconds"].values[(("tier", "medium"),)]) == 3
    assert total(m["ponder_depth_decisions"], decision="confidence") == 1
    assert total(m["ponder_requests"], status="ok", exit_reason="confidence", tier="medium") == 1
    assert m["ponder_rounds_per_request"].values[(("strategy", "cot"), ("tier", "medium"))] == [3]
    assert m["ponder_exit_confidence"].values[(("exit_reason", "confidence"), ("tier", "medium"))] == [0.95]
    assert total(m["ponder_tokens_saved_by_early_exit"]) == 20  # 1 round left x 20 tokens a round
    assert total(m["ponder_degraded_requests"], reason="deep_sessions") == 1
    assert total(m["ponder_degraded_requests"], reason="tokens_per_minute") == 1  # no counts, no key
    assert len(m["ponder_degraded_requests"].values) == 2


def test_a_failed_request_is_counted_without_an_outcome():
    r = Recorder(Fake)
    r.request(None, "low", "cot", "error")
    assert total(r.m["ponder_requests"], status="error", exit_reason="none") == 1
    assert not r.m["ponder_rounds_per_request"].values


def test_metric_names_and_labels_are_bounded():
    for name, (_, _, tags, _) in SPECS.items():
        assert name.startswith("ponder_")
        assert not {"request_id", "session", "replica", "worker"} & set(tags)


def test_a_tot_request_counts_every_node_s_tokens_at_the_end():
    r = Recorder(Fake)
    plan = RoundPlan("high", 1, 4, None, strategy="tot")
    best = [rec(0, 10), rec(1, 12)]
    outcome = Outcome(
        plan,
        best,
        Reason.CEILING,
        "a",
        "r",
        tot={"nodes": 5},
        all_prompt_tokens=500,
        all_completion_tokens=60,
    )
    r.request(outcome, "high", "tot", "ok")
    assert total(r.m["ponder_round_tokens"], kind="completion") == 60
    assert total(r.m["ponder_round_tokens"], kind="reasoning") == 48  # all but the answer's 12
    assert total(r.m["ponder_round_tokens"], kind="prompt") == 500
    assert r.m["ponder_tot_nodes_per_request"].values[(("tier", "high"),)] == [5]


def test_log_lines_carry_ids_and_numbers_never_text(caplog):
    import logging

    from services.control.client import Control
    from services.ingress.metrics import log_request, log_round

    plan = RoundPlan("medium", 1, 4, 0.8)
    r = rec(1, 20, cached=96, loaded=64)
    r.text = "SECRET ANSWER TEXT"
    with caplog.at_level(logging.INFO, logger="ponder.requests"):
        log_round("chatcmpl-1", plan, r, Verdict(Action.EXIT, Reason.CONFIDENCE))
        log_request(
            "chatcmpl-1",
            plan,
            Outcome(plan, [r], Reason.CONFIDENCE, "SECRET ANSWER TEXT", ""),
            "ok",
            Control(),
        )
    round_line, request_line = (rec_.getMessage() for rec_ in caplog.records)
    assert round_line.startswith("round request_id=chatcmpl-1 session=chatcmpl-1 tier=medium")
    for field in (
        "round=1",
        "completion_tokens=20",
        "kv_cached_tokens=32",
        "kv_loaded_tokens=64",
        "confidence=0.9000",
        "decision=exit",
        "reason=confidence",
    ):
        assert field in round_line
    for field in ("status=ok", "exit_reason=confidence", "rounds=1", "max_rounds=4", "completion_tokens=20"):
        assert field in request_line
    assert "SECRET" not in round_line + request_line


def test_a_thinking_request_counts_its_trace_probes_and_answer_once():
    r = Recorder(Fake)
    plan = RoundPlan("medium", 1, 4, 0.8, segment_tokens=32)
    segs = [rec(0, 32), rec(1, 32, cached=120)]
    answer = rec(2, 7, cached=180)
    verdicts = [Verdict(Action.CONTINUE, Reason.BELOW_THRESHOLD), Verdict(Action.EXIT, Reason.CONFIDENCE)]
    for rd, v in zip(segs, verdicts, strict=True):
        r.round("medium", rd, v, False)  # segments are reasoning, the answer follows (RoundDone.answers)
    probes = [{"segment": 0, "answer": "4", "tokens": 3}, {"segment": 1, "answer": None, "tokens": 5}]
    thinking = {
        "thinking_tokens": 64,
        "segments": 2,
        "closed_by": "confidence",
        "probes": probes,
        "probe_tokens": 8,
    }
    out = Outcome(
        plan,
        [*segs, answer],
        Reason.CONFIDENCE,
        "4",
        "x",
        thinking=thinking,
        all_prompt_tokens=303 + 250,  # two probes' prompts
        all_completion_tokens=71 + 8,
    )
    r.request(out, "medium", "cot", "ok")
    m = r.m
    assert total(m["ponder_round_tokens"], kind="completion") == 79 == out.total_completion_tokens
    assert total(m["ponder_round_tokens"], kind="reasoning") == 72 == out.total_reasoning_tokens
    assert total(m["ponder_round_tokens"], kind="prompt") == 553 == out.total_prompt_tokens
    assert total(m["ponder_round_tokens"], kind="probe") == 8
    assert total(m["ponder_round_tokens"], kind="kv_cached") == 300
    assert m["ponder_thinking_tokens_per_request"].values == {
        (("closed_by", "confidence"), ("tier", "medium")): [64]
    }
    assert total(m["ponder_thinking_segments"]) == 2
    assert (
        total(m["ponder_thinking_probes"], result="answered")
        == 1
        == total(m["ponder_thinking_probes"], result="none")
    )
    assert total(m["ponder_tokens_saved_by_early_exit"]) == 2 * 32  # two segments short of four
