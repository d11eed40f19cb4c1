"""Thinking mode end to end (issue 16): configs/local-cpu-thinking.yaml — the default model given a
chat template that opens a <think> trace — served by a real Ray cluster and vLLM over HTTP. SmolLM2
is no reasoning model: these check the mechanics (budgets, the close, the cached trace, the stream),
not the answers."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from cluster.local import free_port, running
from cluster.models import SMALL_MODEL, ensure_model
from services.config import AppConfig
from services.reasoning.thinking import TRANSITION
from services.reasoning.tiers import TierTable

pytestmark = pytest.mark.e2e
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "local-cpu-thinking.yaml"
NEVER = {"confidence_threshold": 1.0}  # no segment is that sure: thinking runs to its budget


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> AppConfig:
    cfg = AppConfig.load(CONFIG)
    cfg.depth_control.state_dir = str(tmp_path_factory.mktemp("state"))
    cfg.engine.model_path = str(ensure_model(SMALL_MODEL))
    cfg.engine.max_model_len = 2048
    cfg.engine.kv_cache_memory_bytes = 128 << 20
    cfg.ray.dashboard, cfg.ray.num_cpus = False, 4
    cfg.http.port, cfg.ray.metrics_export_port = free_port(), free_port()
    return cfg


@pytest.fixture(scope="module")
def http(cfg):
    with (
        running(cfg, progress=lambda m: print(m, flush=True)) as url,
        httpx.Client(base_url=url, timeout=300) as c,
    ):
        yield c


def body(cfg, reasoning, **kw):
    return {
        "model": cfg.engine.model,
        "messages": [{"role": "user", "content": "What is 17 + 25?"}],
        "max_tokens": 12,
        "temperature": 0.0,
        "ignore_eos": True,  # every segment runs to its cap unless the model writes </think>
        "reasoning": reasoning,
        **kw,
    }


@pytest.mark.parametrize("tier", ["low", "medium"])
def test_thinking_runs_to_its_tier_budget_exactly_then_answers_from_the_cached_trace(http, cfg, tier):
    t = TierTable.load(cfg.depth_control.tiers_file).tiers[tier]
    r = http.post("/v1/chat/completions", json=body(cfg, {"tier": tier, **NEVER}))
    assert r.status_code == 200, r.text
    data = r.json()
    s, msg = data["reasoning"], data["choices"][0]["message"]
    thinking = s["thinking"]
    assert thinking["thinking_tokens"] == t.max_rounds * t.segment_tokens  # the budget, exactly
    assert thinking["segments"] == t.max_rounds and thinking["closed_by"] == "ceiling"
    assert [x["completion_tokens"] for x in s["rounds"][:-1]] == [t.segment_tokens] * t.max_rounds
    answer = s["rounds"][-1]
    assert answer["decision"] == "answer" and answer["completion_tokens"] == 12
    # The answer's prompt is the trace plus its close: the trace was computed once, then cached
    # (whole KV blocks: at least every segment's but the last).
    assert answer["kv_cached_tokens"] + answer["kv_loaded_tokens"] >= (t.max_rounds - 1) * t.segment_tokens
    assert msg["reasoning_content"].count(TRANSITION) == 1  # closed once, by depth control
    assert "</think>" not in msg["content"] and "<think>" not in msg["reasoning_content"]
    # the trace and its probes (medium's) are the reasoning tax; the answer is not
    reasoning_tokens = thinking["thinking_tokens"] + thinking["probe_tokens"]
    assert data["usage"]["completion_tokens_details"]["reasoning_tokens"] == reasoning_tokens


def test_critical_thinks_its_whole_budget_and_holds_the_answer_for_review(http, cfg):
    """Critical (review: true) answers 202 with the proposal; its trace ran the tier's budget exactly."""
    t = TierTable.load(cfg.depth_control.tiers_file).tiers["critical"]
    r = http.post("/v1/chat/completions", json=body(cfg, {"tier": "critical", **NEVER}))
    assert r.status_code == 202, r.text
    proposed = r.json()["proposed"]
    thinking = proposed["reasoning"]["thinking"]
    assert thinking["thinking_tokens"] == t.max_rounds * t.segment_tokens, thinking
    assert (thinking["segments"], thinking["closed_by"]) == (t.max_rounds, "ceiling"), thinking
    assert proposed["reasoning_content"].count(TRANSITION) == 1 and "</think>" not in proposed["content"]


@pytest.mark.parametrize("effort", ["low", "high"])
def test_reasoning_effort_names_the_tier_whose_thinking_budget_holds(http, cfg, effort):
    """OpenAI's reasoning_effort picks the tier; its thinking stays within that tier's budget."""
    t = TierTable.load(cfg.depth_control.tiers_file).tiers[effort]
    r = http.post("/v1/chat/completions", json=body(cfg, NEVER, reasoning_effort=effort))
    assert r.status_code == 200, r.text
    s = r.json()["reasoning"]
    assert s["tier"] == effort and s["tier_reason"].startswith("requested"), s
    thinking = s["thinking"]
    budget = {"min": t.min_rounds * t.segment_tokens, "max": t.max_rounds * t.segment_tokens}
    assert {k: thinking["budget"][k] for k in budget} == budget, thinking
    assert 0 < thinking["thinking_tokens"] <= budget["max"], thinking


def test_thinking_token_budget_is_a_hard_cap_in_tokens_and_a_bad_one_is_a_400(http, cfg):
    r = http.post(
        "/v1/chat/completions", json=body(cfg, {"tier": "medium", **NEVER}, thinking_token_budget=40)
    )
    assert r.status_code == 200, r.text
    s = r.json()["reasoning"]
    assert s["thinking"]["thinking_tokens"] == 40 and [x["completion_tokens"] for x in s["rounds"][:-1]] == [
        32,
        8,
    ]
    bad = http.post("/v1/chat/completions", json=body(cfg, {"tier": "low"}, thinking_token_budget=10_000))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "thinking_token_budget", bad.text


def test_the_stream_is_the_trace_then_the_answer_as_the_blocking_response(http, cfg):
    b = body(cfg, {"tier": "low", **NEVER})
    blocking = http.post("/v1/chat/completions", json=b).json()
    reasoning, content, order = [], [], []
    with http.stream("POST", "/v1/chat/completions", json={**b, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
            if delta.get("reasoning_content"):
                reasoning.append(delta["reasoning_content"]), order.append("r")
            if delta.get("content"):
                content.append(delta["content"]), order.append("c")
    msg = blocking["choices"][0]["message"]
    assert "".join(reasoning) == msg["reasoning_content"] and "".join(content) == msg["content"]
    assert "r" not in order[order.index("c") :]


def test_the_least_thinking_holds_when_the_model_stops_early(http, cfg):
    """SmolLM2 ends its turn after a few tokens (EOS): within its budget it is told to go on."""
    b = body(cfg, {"tier": "medium"}, ignore_eos=False)
    s = http.post("/v1/chat/completions", json=b).json()["reasoning"]
    t = s["thinking"]
    assert t["budget"]["min"] <= t["thinking_tokens"] <= t["budget"]["max"], t
    assert t["segments"] >= 3  # medium's min_rounds


def test_probes_ask_the_closed_trace_and_never_enter_it(http, cfg):
    """Medium probes after segments 1 and 2 (stable_for 2, min 3 segments); two probes that agree end
    thinking after segment 2, else it runs to its fourth. Probe tokens are paid for in usage."""
    r = http.post("/v1/chat/completions", json=body(cfg, {"tier": "medium", **NEVER}))
    assert r.status_code == 200, r.text
    data = r.json()
    t, msg = data["reasoning"]["thinking"], data["choices"][0]["message"]
    probes = t["probes"]
    assert [p["segment"] for p in probes] == [1, 2]  # none after the last segment (4th) can count
    agree = probes[0]["answer"] is not None and probes[0]["answer"] == probes[1]["answer"]
    assert (t["segments"], t["closed_by"]) == ((3, "stable_answers") if agree else (4, "ceiling")), probes
    assert all(0 < p["tokens"] <= 8 for p in probes) and t["probe_tokens"] == sum(p["tokens"] for p in probes)
    assert (
        "I now have enough" not in msg["reasoning_content"]
        and "Final answer:" not in msg["reasoning_content"]
    )
    rounds = data["reasoning"]["rounds"]
    assert (
        data["usage"]["completion_tokens"] == sum(x["completion_tokens"] for x in rounds) + t["probe_tokens"]
    )
    assert [x["answer"] for x in rounds[1 : 1 + len(probes)]] == [p["answer"] for p in probes]


def test_confidence_ends_thinking_at_the_first_segment_that_reaches_the_threshold(http, cfg):
    """High as a chain (4-6 segments, exit on confidence alone): run it to its ceiling to read each segment's
    confidence, then again with a threshold just under one of them: greedy decoding repeats the same
    segments, so thinking must end exactly at the first allowed segment that reaches it."""
    full = http.post(
        "/v1/chat/completions", json=body(cfg, {"tier": "high", "strategy": "cot", **NEVER})
    ).json()["reasoning"]
    conf = [x["confidence"] for x in full["rounds"][:-1]]
    assert len(conf) == 6 and all(c is not None for c in conf), conf
    threshold = round(max(conf[3], conf[4]) - 0.0005, 4)
    expected = next(i for i in (3, 4) if conf[i] >= threshold + 0.0002) + 1
    s = http.post(
        "/v1/chat/completions",
        json=body(cfg, {"tier": "high", "strategy": "cot", "confidence_threshold": threshold}),
    ).json()["reasoning"]
    assert s["thinking"]["segments"] == expected and s["thinking"]["closed_by"] == "confidence", (conf, s)
    assert [x["decision"] for x in s["rounds"]][:3] == ["min_rounds"] * 3


def test_max_completion_tokens_bounds_trace_and_answer_leaving_the_answer_its_reserve(http, cfg):
    b = body(cfg, {"tier": "medium", **NEVER}, max_completion_tokens=60)
    del b["max_tokens"]
    data = http.post("/v1/chat/completions", json=b).json()
    t = data["reasoning"]["thinking"]
    reserve = min(cfg.router.answer_reserve_tokens, 30)
    assert (
        t["budget"]["answer_reserve"] == reserve and t["thinking_tokens"] + t["probe_tokens"] == 60 - reserve
    )
    assert data["reasoning"]["rounds"][-1]["completion_tokens"] == reserve  # ignore_eos: it fills its room
    assert data["usage"]["completion_tokens"] == 60


def test_tree_of_thought_over_segments_branches_from_one_cached_trace(http, cfg):
    """High: Tree-of-Thought over segments (2 next segments per expansion from the same trace prefix,
    beam of 1, 10 nodes, every new segment probed); the best path's trace is closed and answered."""
    t = TierTable.load(cfg.depth_control.tiers_file).tiers["high"]
    r = http.post(
        "/v1/chat/completions", json=body(cfg, {"tier": "high", "strategy": "tot", **NEVER}, seed=7)
    )  # siblings sample
    assert r.status_code == 200, r.text
    data = r.json()
    s, msg = data["reasoning"], data["choices"][0]["message"]
    tot, th = s["tot"], s["thinking"]
    assert tot["nodes"] == t.tot["max_total_nodes"] and tot["expansions"] == 5 and tot["depth"] == 5, tot
    path = s["rounds"][:-1]
    # the best-scored node at min_depth or deeper answers (probe agreement may prefer a shallower one)
    assert th["segments"] == len(tot["best_path"]) == len(path)
    assert min(t.min_rounds, tot["depth"]) <= len(path) <= tot["depth"], tot
    assert [x["index"] for x in path] == list(range(len(path)))
    assert (
        th["thinking_tokens"] == sum(x["completion_tokens"] for x in path) <= t.max_rounds * t.segment_tokens
    )
    assert th["all_thinking_tokens"] > th["thinking_tokens"]  # the siblings not taken
    # every segment probed once, unless its model closed the trace (then it answers as it is)
    probed = [p["node"] for p in th["probes"]]
    assert len(set(probed)) == len(probed) and len(probed) >= tot["nodes"] - 2, probed
    assert "Final answer:" not in msg["reasoning_content"] and "[tot node 10:" in msg["reasoning_content"]
    answer = s["rounds"][-1]
    # the answer's prompt is the best path's trace: all but its last segment were computed before
    assert answer["kv_cached_tokens"] + answer["kv_loaded_tokens"] >= (len(path) - 1) * t.segment_tokens
    spent = th["all_thinking_tokens"] + th["probe_tokens"] + answer["completion_tokens"]
    assert data["usage"]["completion_tokens"] == spent
