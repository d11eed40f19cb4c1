"""Reasoning control end to end (issue 3) on a local Ray cluster serving SmolLM2: Tree-of-Thought under
a shared node budget, admission under pressure, the depth-control actor killed and resumed, human
review, feedback and the bad-input refusals. Budgets are set small so pressure is reached on 2 cores."""

import concurrent.futures as cf
import json
import time

import httpx
import pytest
import ray

from cluster.local import running

pytestmark = pytest.mark.e2e

Q = "What is 17 + 25?"
NODE_CAP = 2  # ToT children being generated at once, cluster-wide
DEEP_CAP = 2  # deep sessions (ceiling >= 4 rounds) in flight at once


@pytest.fixture(scope="module")
def cfg(app_config):
    cfg = app_config.model_copy(deep=True)
    cfg.depth_control.budgets.max_tot_nodes_in_flight = NODE_CAP
    cfg.depth_control.budgets.max_deep_sessions = DEEP_CAP
    return cfg


@pytest.fixture(scope="module")
def base_url(cfg):
    with running(cfg, progress=lambda m: print(m, flush=True)) as url:
        yield url


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=300) as c:
        yield c


def body(cfg, reasoning, question=Q, max_tokens=12, **kw):
    return {
        "model": cfg.engine.model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": 7,
        "reasoning": reasoning,
        **kw,
    }


def actor(cfg):
    return ray.get_actor(cfg.depth_control.name, namespace=cfg.depth_control.namespace)


def parallel(http, bodies):
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: http.post("/v1/chat/completions", json=b), bodies))


def test_tot_never_exceeds_node_or_depth_budgets_under_concurrency(http, cfg):
    tot = {"branching": 2, "max_total_nodes": 5}
    resps = parallel(http, [body(cfg, {"tier": "high", "tot": tot}, seed=s) for s in range(3)])
    for r in resps:
        assert r.status_code == 200, r.text
        s = r.json()["reasoning"]
        assert s["strategy"] == "tot"
        assert 1 <= s["tot"]["nodes"] <= 5  # the request's node budget
        assert s["tot"]["depth"] <= s["max_rounds"] <= 6  # depth bound = round ceiling
        assert len(s["rounds"]) == len(s["tot"]["best_path"]) <= s["tot"]["depth"]
        usage = r.json()["usage"]
        assert usage["completion_tokens"] >= sum(x["completion_tokens"] for x in s["rounds"])
    stats = ray.get(actor(cfg).stats.remote())
    assert 1 <= stats["peak_tot_nodes_in_flight"] <= NODE_CAP  # the shared budget held
    assert stats["budgets"]["tot_nodes_in_flight"] == 0  # every grant was released


def test_pressure_degrades_ceilings_instead_of_failing(http, cfg):
    reasoning = {"tier": "medium", "min_rounds": 4, "confidence_threshold": 1.0}
    resps = parallel(
        http, [body(cfg, reasoning, max_tokens=16, ignore_eos=True) for _ in range(DEEP_CAP + 1)]
    )
    summaries = [r.json()["reasoning"] for r in resps if r.status_code == 200]
    assert len(summaries) == DEEP_CAP + 1  # nobody refused
    degraded = [s for s in summaries if s["degraded"]]
    assert len(degraded) >= 1
    limit = cfg.depth_control.budgets.degraded_max_rounds
    for s in degraded:
        assert s["max_rounds"] == limit and len(s["rounds"]) <= limit
        assert any("deep_sessions" in why for why in s["degraded_reasons"])
    for s in summaries:
        if not s["degraded"]:
            assert len(s["rounds"]) == 4


def test_stream_shows_tot_exploration_then_the_answer(http, cfg):
    b = body(cfg, {"tier": "high", "tot": {"branching": 2, "max_total_nodes": 4}}, stream=True)
    reasoning, content, final = [], [], None
    with http.stream("POST", "/v1/chat/completions", json=b) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
            reasoning.append(delta.get("reasoning_content", ""))
            content.append(delta.get("content", ""))
            final = chunk.get("reasoning") or final
    assert "[tot node 1" in "".join(reasoning) and "[tot: expanding node 0" in "".join(reasoning)
    assert final["tot"]["nodes"] <= 4 and "".join(content).strip()


def test_killed_depth_control_restarts_with_its_state_and_ceilings_hold(http, cfg):
    a = actor(cfg)
    before = ray.get(a.stats.remote())
    reasoning = {"tier": "medium", "min_rounds": 4, "confidence_threshold": 1.0}
    with cf.ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(
                http.post, "/v1/chat/completions", json=body(cfg, reasoning, max_tokens=24, ignore_eos=True)
            )
            for _ in range(2)
        ]
        deadline = time.monotonic() + 120  # wait until both sessions are admitted, then kill
        while ray.get(a.stats.remote())["budgets"]["sessions"] < 2:
            assert time.monotonic() < deadline, "sessions were never admitted"
        ray.kill(a, no_restart=False)
        resps = [f.result() for f in futures]
    after = ray.get(actor(cfg).stats.remote())  # waits for the restarted actor
    assert after["starts"] == before["starts"] + 1
    for k, v in before["decisions"].items():  # counters resumed from the checkpoint, not reset
        assert after["decisions"].get(k, 0) >= v
    for r in resps:
        assert r.status_code == 200, r.text
        s = r.json()["reasoning"]
        assert len(s["rounds"]) <= s["max_rounds"] <= 4  # no request exceeded its ceiling
        assert s["depth_control"] in ("ok", "unreachable")
    deadline = time.monotonic() + 60  # the resumed sessions were finished by their routers
    while ray.get(actor(cfg).stats.remote())["budgets"]["sessions"] > 0:
        assert time.monotonic() < deadline


def test_critical_answers_are_held_for_review_then_released(http, cfg):
    r = http.post("/v1/chat/completions", json=body(cfg, {"tier": "critical", "max_rounds": 2}, max_tokens=8))
    assert r.status_code == 202, r.text
    review = r.json()
    assert review["status"] == "pending" and review["completion"] is None
    assert review["proposed"]["content"] and review["proposed"]["reasoning"]["tier"] == "critical"
    rid = review["id"]
    pending = http.get("/v1/reviews", params={"status": "pending"}).json()["data"]
    assert rid in [x["id"] for x in pending]
    approved = http.post(f"/v1/reviews/{rid}/approve", json={"reviewer": "dr-x", "note": "ok"})
    assert approved.status_code == 200, approved.text
    got = http.get(f"/v1/reviews/{rid}").json()
    assert got["status"] == "approved" and got["reviewer"] == "dr-x"
    assert got["completion"]["choices"][0]["message"]["content"] == review["proposed"]["content"]
    again = http.post(f"/v1/reviews/{rid}/reject")
    assert again.status_code == 409 and "approved" in again.json()["error"]["message"]


def test_feedback_is_recorded_once_per_request(http, cfg):
    r = http.post("/v1/chat/completions", json=body(cfg, {"tier": "low", "domain": "math"}, max_tokens=8))
    assert r.status_code == 200
    rid = r.json()["id"]
    assert r.json()["reasoning"]["domain"] == "math"
    ok = http.post("/v1/feedback", json={"request_id": rid, "correct": True})
    assert ok.status_code == 200, ok.text
    assert ok.json()["domain"] == "math"
    assert http.post("/v1/feedback", json={"request_id": rid, "correct": False}).status_code == 409
    domains = http.get("/v1/domains").json()["domains"]
    assert "math" in domains and domains["math"]["threshold"] is not None


@pytest.mark.parametrize(
    ("method", "path", "payload", "status", "needle"),
    [
        ("post", "/v1/chat/completions", {"reasoning": {"strategy": "mcts"}}, 400, "strategy"),
        ("post", "/v1/chat/completions", {"reasoning": {"domain": "astrology"}}, 400, "unknown domain"),
        (
            "post",
            "/v1/chat/completions",
            {"reasoning": {"tier": "high", "tot": {"branching": 4}}},
            400,
            "branching",
        ),
        (
            "post",
            "/v1/chat/completions",
            {"reasoning": {"tier": "high", "tot": {"max_total_nodes": 11}}},
            400,
            "at most 10",
        ),
        ("post", "/v1/feedback", {"request_id": "chatcmpl-nope", "correct": True}, 404, "chatcmpl-nope"),
        ("post", "/v1/feedback", {"request_id": "x"}, 400, "correct"),
        ("post", "/v1/reviews/review-nope/approve", None, 404, "review-nope"),
        ("get", "/v1/reviews/review-nope", None, 404, "review-nope"),
        ("get", "/v1/reviews?status=maybe", None, 400, "status"),
    ],
)
def test_bad_control_input_gets_a_clear_4xx(http, cfg, method, path, payload, status, needle):
    if path == "/v1/chat/completions":
        payload = {**body(cfg, {}), **payload}
    r = http.request(method.upper(), path, json=payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]
