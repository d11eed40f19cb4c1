"""Reasoning control end to end (issue 3) on a local Ray cluster serving SmolLM2: Tree-of-Thought under
a shared node budget, admission under pressure, the depth-control actor killed and resumed, human
review, feedback and the bad-input refusals. Budgets are set small so pressure is reached on 2 cores.

The same cluster has API keys on (issue 7): every request here carries one, and the last test checks
the refusals (401/403/429) and that no key reaches a log. Sharing the cluster saves a start-up."""

import concurrent.futures as cf
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
import ray
import yaml

from cluster.keys import new_key
from cluster.local import running
from services.ingress.auth import hash_key
from services.reasoning.tiers import TOT_BUDGET_SPENT

pytestmark = pytest.mark.e2e

Q = "What is 17 + 25?"
NODE_CAP = 2  # ToT children being generated at once, cluster-wide
DEEP_CAP = 2  # deep sessions (ceiling >= 4 rounds) in flight at once


# name -> limits; raw keys are made per run and written only as hashes
KEYS = {
    "ops": {},
    "low-only": {"tiers": ["low"]},
    "two-per-minute": {"requests_per_minute": 2},
    "one-token": {"tokens_per_minute": 1},
}


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    return {name: new_key() for name in KEYS}


@pytest.fixture(scope="module")
def cfg(app_config, keys, tmp_path_factory):
    cfg = app_config.model_copy(deep=True)
    cfg.depth_control.budgets.max_tot_nodes_in_flight = NODE_CAP
    cfg.depth_control.budgets.max_deep_sessions = DEEP_CAP
    entries = [{"name": n, "sha256": hash_key(keys[n]), **limits} for n, limits in KEYS.items()]
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": entries}))
    cfg.auth.api_keys_file = str(path)
    return cfg


@pytest.fixture(scope="module")
def base_url(cfg):
    with running(cfg, progress=lambda m: print(m, flush=True)) as url:
        yield url


@pytest.fixture(scope="module")
def http(base_url, keys):
    with httpx.Client(base_url=base_url, timeout=300, headers=bearer(keys["ops"])) as c:
        yield c


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


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
    searched = 0
    for r in resps:
        assert r.status_code == 200, r.text
        s = r.json()["reasoning"]
        if s["strategy"] == "cot":
            # Its root asked while the others held every node: it ran as a chain and says why.
            assert s["degraded"] and TOT_BUDGET_SPENT in s["degraded_reasons"], s
            assert s["tot"] is None and len(s["rounds"]) <= s["max_rounds"]
            continue
        searched += 1
        assert s["strategy"] == "tot"
        assert 1 <= s["tot"]["nodes"] <= 5  # the request's node budget
        assert s["tot"]["depth"] <= s["max_rounds"] <= 6  # depth bound = round ceiling
        assert len(s["rounds"]) == len(s["tot"]["best_path"]) <= s["tot"]["depth"]
        usage = r.json()["usage"]
        assert usage["completion_tokens"] >= sum(x["completion_tokens"] for x in s["rounds"])
    assert searched >= 1  # the first root to ask finds the budget free
    stats = settled(cfg)
    assert 1 <= stats["peak_tot_nodes_in_flight"] <= NODE_CAP  # the shared budget held
    assert stats["budgets"]["tot_nodes_in_flight"] == 0  # every lease was freed when its search ended


def settled(cfg, timeout_s: float = 60.0) -> dict:
    """Depth control's stats once every finished session's (fire-and-forget) finish has landed."""
    deadline = time.monotonic() + timeout_s
    while (stats := ray.get(actor(cfg).stats.remote()))["budgets"]["sessions"] > 0:
        assert time.monotonic() < deadline, "sessions still open"
        time.sleep(0.05)
    return stats


def test_depth_control_costs_two_calls_per_chain_and_one_lease_per_search(http, cfg):
    """Central policy, local verdicts: admit and finish, whatever the rounds; ToT nodes in leases."""
    before = settled(cfg)["calls"]
    chain = {"tier": "medium", "min_rounds": 1, "confidence_threshold": 1.0}
    r = http.post("/v1/chat/completions", json=body(cfg, chain, max_tokens=6, ignore_eos=True))
    assert r.status_code == 200, r.text
    rounds = r.json()["reasoning"]["rounds"]
    assert len(rounds) == 4 and [x["decided_by"] for x in rounds] == ["router"] * 4
    after = settled(cfg)["calls"]
    moved = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}
    assert {k: v for k, v in moved.items() if v} == {"admit": 1, "finish": 1}
    tot = http.post("/v1/chat/completions", json=body(cfg, {"tier": "high", "tot": {"branching": 2}}))
    assert tot.status_code == 200, tot.text
    expansions = tot.json()["choices"][0]["message"]["reasoning_content"].count("[tot: expanding node")
    assert expansions >= 2
    final = settled(cfg)["calls"]
    grants = final.get("grant_nodes", 0) - after.get("grant_nodes", 0)
    lease = cfg.depth_control.node_lease
    assert 1 <= grants <= -(-expansions // lease)
    assert final["admit"] - after["admit"] == 1 and final["finish"] - after["finish"] == 1
    assert final.get("decide", 0) == after.get("decide", 0) and final.get("release_nodes", 0) == 0


def test_a_changed_domain_threshold_reaches_new_requests_within_5_s(http, cfg):
    """The records actor's table (written here as an operator would, same file) is granted to new
    admissions within threshold_refresh_s; the bound promised is 5 s."""
    from services.control.records import state_path
    from services.control.state import StateStore

    def granted() -> float:
        b = body(cfg, {"tier": "low", "domain": "general"}, max_tokens=2)
        r = http.post("/v1/chat/completions", json=b)
        assert r.status_code == 200, r.text
        return r.json()["reasoning"]["confidence_threshold"]

    store = StateStore(state_path(cfg.depth_control))
    old = granted()
    new = 0.5 if old != 0.5 else 0.6
    t0 = time.monotonic()
    store.set_threshold("general", new, source="operator", now=time.time())
    try:
        while (seen := granted()) != new:
            assert seen == old and time.monotonic() - t0 < 5.0, f"still {seen} after 5 s"
        assert time.monotonic() - t0 <= 5.0
    finally:
        store.set_threshold("general", old, source="operator", now=time.time())


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


def durable(domains: dict) -> dict:
    """The records' part of GET /v1/domains (the depth value moves with every finished chain)."""
    return {name: {k: v for k, v in d.items() if k != "depth_value"} for name, d in domains.items()}


def test_killed_depth_control_restarts_with_its_state_and_ceilings_hold(http, cfg):
    # Durable data made before the kill: a pending review, a feedback record, the domains' thresholds.
    critical = body(cfg, {"tier": "critical", "max_rounds": 2}, max_tokens=8)
    held = http.post("/v1/chat/completions", json=critical)
    assert held.status_code == 202, held.text
    fed = http.post("/v1/chat/completions", json=body(cfg, {"tier": "low", "domain": "math"}, max_tokens=8))
    feedback = {"request_id": fed.json()["id"], "correct": True}
    assert http.post("/v1/feedback", json=feedback).status_code == 200
    domains_before = durable(http.get("/v1/domains").json()["domains"])
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
    # Nothing durable was lost: the review is still pending, the feedback still counts once.
    review = http.get(f"/v1/reviews/{held.json()['id']}")
    assert review.status_code == 200 and review.json()["status"] == "pending", review.text
    assert http.post("/v1/feedback", json={**feedback, "correct": False}).status_code == 409
    domains_after = http.get("/v1/domains").json()["domains"]
    assert durable(domains_after) == domains_before
    # what later rounds were worth (depth control's, it survived the kill): the math request counted
    assert "low" in domains_after["math"]["depth_value"], domains_after["math"]


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


def openai_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]
    return err


def test_api_keys_refuse_with_openai_errors_and_no_key_reaches_a_log(base_url, cfg, keys):
    low = body(cfg, {"tier": "low", "max_rounds": 1}, max_tokens=4, ignore_eos=True)
    with httpx.Client(base_url=base_url, timeout=300) as c:  # no key of its own
        r = c.post("/v1/chat/completions", json=low)
        openai_error(r, 401, "missing_api_key")
        assert r.headers["www-authenticate"].startswith("Bearer")
        openai_error(c.get("/v1/models", headers=bearer("pk-not-a-key")), 401, "invalid_api_key")
        assert c.get("/healthz").status_code == 200
        medium = body(cfg, {"tier": "medium"})
        r = c.post("/v1/chat/completions", json=medium, headers=bearer(keys["low-only"]))
        assert openai_error(r, 403, "tier_not_allowed")["param"] == "reasoning.tier"
        limited = bearer(keys["two-per-minute"])
        assert [c.get("/v1/models", headers=limited).status_code for _ in range(2)] == [200, 200]
        r = c.get("/v1/models", headers=limited)
        assert openai_error(r, 429, "rate_limit_exceeded")["type"] == "requests"
        assert 1 <= int(r.headers["retry-after"]) <= 60
        capped = bearer(keys["one-token"])
        ok = c.post("/v1/chat/completions", json=low, headers=capped)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4, ok.text
        r = c.post("/v1/chat/completions", json=low, headers=capped)
        assert openai_error(r, 429, "rate_limit_exceeded")["type"] == "tokens"
        assert 1 <= int(r.headers["retry-after"]) <= 60
    sdk = openai.OpenAI(base_url=f"{base_url}/v1", api_key="pk-not-a-key-either", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        sdk.models.list()
    with pytest.raises(openai.RateLimitError):
        sdk.with_options(api_key=keys["two-per-minute"]).models.list()

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    routers = list((logs / "serve").glob("replica_*Router*.log"))
    deadline = time.monotonic() + 30  # the request line is written when the session ends
    while not any("api_key=one-token " in p.read_text(errors="replace") for p in routers):
        assert time.monotonic() < deadline, "no request line names the key"
        time.sleep(0.5)
    secrets = [k.encode() for k in (*keys.values(), "pk-not-a-key", "pk-not-a-key-either")]
    for p in (p for p in logs.rglob("*") if p.is_file()):
        data = p.read_bytes()
        leaked = [s[:6] for s in secrets if s in data]
        assert not leaked, f"{p} holds an API key"


def test_ponder_chat_sends_the_key_from_the_environment(base_url, keys, monkeypatch, capsys):
    from cluster import cli

    argv = ["chat", "Say hi.", "--url", base_url, "--tier", "low", "--max-rounds", "1", "--max-tokens", "4"]
    monkeypatch.delenv("PONDER_API_KEY", raising=False)
    assert cli.main(argv) == 1
    assert "HTTP 401" in capsys.readouterr().err
    monkeypatch.setenv("PONDER_API_KEY", keys["ops"])
    assert cli.main(argv) == 0
    assert "[answer]" in capsys.readouterr().out
