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
from cluster.models import DEFAULT_MODEL, ensure_model
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
    cfg.engine.model_path = str(ensure_model(DEFAULT_MODEL))
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


@pytest.mark.parametrize("tier", ["low", "medium", "high"])
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
    assert data["usage"]["completion_tokens_details"]["reasoning_tokens"] == thinking["thinking_tokens"]


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
