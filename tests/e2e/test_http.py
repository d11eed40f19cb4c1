"""HTTP end to end: the official openai client and raw HTTP against a local Ray cluster serving
SmolLM2 on CPU vLLM."""

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

Q = "What is 17 + 25?"


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=300) as c:
        yield c


def ask(client, model, reasoning, question=Q, max_tokens=24, **kw):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=max_tokens,
        extra_body={"reasoning": reasoning},
        **kw,
    )


def rounds_of(resp) -> list[dict]:
    return resp.model_extra["reasoning"]["rounds"]


def test_medium_tier_answers_in_several_rounds_with_confidence(client, app_config):
    model = client.models.list().data[0].id
    assert model == app_config.engine.model
    resp = ask(client, model, {"tier": "medium"})
    summary = resp.model_extra["reasoning"]
    rounds = summary["rounds"]
    assert summary["tier"] == "medium"
    assert 3 <= len(rounds) <= 4
    assert summary["exit_reason"] in ("confidence", "ceiling")
    assert [r["index"] for r in rounds] == list(range(len(rounds)))
    assert all(0.0 <= r["confidence"] <= 1.0 and r["latency_ms"] > 0 for r in rounds)
    assert all(r["prompt_tokens"] > 0 and r["completion_tokens"] > 0 for r in rounds)
    # every round's prompt extends the last one: the transcript grows
    assert [r["prompt_tokens"] for r in rounds] == sorted(r["prompt_tokens"] for r in rounds)
    msg = resp.choices[0].message
    assert msg.content and msg.model_extra["reasoning_content"].count("[round ") == len(rounds) - 1
    details = resp.usage.completion_tokens_details
    assert details.reasoning_tokens == sum(r["completion_tokens"] for r in rounds[:-1])
    assert resp.usage.completion_tokens == sum(r["completion_tokens"] for r in rounds)
    assert resp.usage.prompt_tokens == sum(r["prompt_tokens"] for r in rounds)


@pytest.mark.parametrize("question", [Q, "Name the capital of France.", "Is 91 a prime number?"])
def test_low_tier_never_exceeds_two_rounds(client, app_config, question):
    model = app_config.engine.model
    for threshold in (None, 1.0):
        reasoning = {"tier": "low"} | ({} if threshold is None else {"confidence_threshold": threshold})
        rounds = rounds_of(ask(client, model, reasoning, question=question, max_tokens=16))
        assert 1 <= len(rounds) <= 2
        if threshold == 1.0:  # never confident enough: runs to the ceiling of 2
            assert len(rounds) == 2


ANSWERS = "Reply with exactly this line: Final answer: hello"  # SmolLM2 does, within 16 tokens


def test_min_rounds_hold_when_confidence_is_maximal(client, app_config):
    # threshold 0: every round that states an answer is "confident", yet exit waits for min_rounds
    resp = ask(
        client,
        app_config.engine.model,
        {"tier": "high", "strategy": "cot", "min_rounds": 3, "max_rounds": 4, "confidence_threshold": 0.0},
        question=ANSWERS,
        max_tokens=16,
    )
    rounds = resp.model_extra["reasoning"]["rounds"]
    assert [r["decision"] for r in rounds][:2] == ["min_rounds", "min_rounds"] and len(rounds) >= 3
    # the first round allowed to exit does, if it stated an answer (a round without one never is confident)
    third = rounds[2]
    assert (third["decision"] == "confidence") == (third["answer"] is not None), rounds
    assert len(rounds) == (3 if third["answer"] is not None else 4)


def test_max_rounds_hold_when_confidence_is_low(client, app_config):
    resp = ask(
        client,
        app_config.engine.model,
        {"tier": "high", "strategy": "cot", "max_rounds": 3, "confidence_threshold": 1.0},
        max_tokens=16,
    )
    summary = resp.model_extra["reasoning"]
    assert len(summary["rounds"]) == 3 and summary["exit_reason"] == "ceiling"


def test_stream_sends_reasoning_then_content_matching_the_blocking_answer(client, app_config):
    model = app_config.engine.model
    reasoning = {"tier": "medium", "max_rounds": 3, "min_rounds": 2}
    blocking = ask(client, model, reasoning)
    stream = ask(client, model, reasoning, stream=True, stream_options={"include_usage": True})
    order, reasoning_text, content, summary, usage = [], [], [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if (delta.model_extra or {}).get("reasoning_content"):
            order.append("r")
            reasoning_text.append(delta.model_extra["reasoning_content"])
        if delta.content:
            order.append("c")
            content.append(delta.content)
        summary = (chunk.model_extra or {}).get("reasoning") or summary
    assert "r" in order and "c" in order
    assert "r" not in order[order.index("c") :]  # no reasoning after the answer began
    assert "".join(content) == blocking.choices[0].message.content
    assert "".join(reasoning_text) == blocking.choices[0].message.model_extra["reasoning_content"]
    assert summary["exit_reason"] == blocking.model_extra["reasoning"]["exit_reason"]
    assert usage.completion_tokens == blocking.usage.completion_tokens


def test_reasoning_effort_picks_the_tier_of_its_name(client, app_config):
    """OpenAI's own parameter, as its client sends it."""
    for effort in ("low", "medium"):
        r = client.chat.completions.create(
            model=app_config.engine.model,
            messages=[{"role": "user", "content": "What is 2 + 3?"}],
            max_tokens=4,
            reasoning_effort=effort,
        )
        summary = r.model_extra["reasoning"]
        assert summary["tier"] == effort and summary["tier_reason"] == "requested", summary


def test_models_and_health(http, app_config):
    data = http.get("/v1/models").json()
    assert [m["id"] for m in data["data"]] == [app_config.engine.model]
    health = http.get("/healthz").json()
    assert health == {"status": "ok", "model": app_config.engine.model, "depth_control": "ok"}


def _bad(model):
    msg = [{"role": "user", "content": "hi"}]
    return [
        ("malformed json", b'{"model": "x", "messages": [', 400, None),
        ("invalid utf-8", b'{"model": "\xff\xfe", "messages": []}', 400, None),
        ("not an object", b"[1, 2, 3]", 400, None),
        ("missing messages", {"model": model}, 400, "messages"),
        ("empty messages", {"model": model, "messages": []}, 400, "messages"),
        ("messages wrong type", {"model": model, "messages": "hi"}, 400, "messages"),
        (
            "bad role",
            {"model": model, "messages": [{"role": "wizard", "content": "x"}]},
            400,
            "messages.0.role",
        ),
        (
            "temperature type",
            {"model": model, "messages": msg, "temperature": "hot"},
            400,
            "temperature",
        ),
        ("n > 1", {"model": model, "messages": msg, "n": 2}, 400, "n"),
        ("unknown model", {"model": "gpt-9", "messages": msg}, 404, "model"),
        (
            "unknown tier",
            {"model": model, "messages": msg, "reasoning": {"tier": "extreme"}},
            400,
            "reasoning.tier",
        ),
        (
            "max_rounds too big",
            {"model": model, "messages": msg, "reasoning": {"max_rounds": 99}},
            400,
            "reasoning.max_rounds",
        ),
        (
            "above tier ceiling",
            {"model": model, "messages": msg, "reasoning": {"tier": "low", "max_rounds": 3}},
            400,
            "reasoning.max_rounds",
        ),
        (
            "min above max",
            {"model": model, "messages": msg, "reasoning": {"max_rounds": 2, "min_rounds": 3}},
            400,
            "reasoning.min_rounds",
        ),
        (
            "threshold out of range",
            {"model": model, "messages": msg, "reasoning": {"confidence_threshold": 1.5}},
            400,
            "reasoning.confidence_threshold",
        ),
        (
            "unknown reasoning field",
            {"model": model, "messages": msg, "reasoning": {"depth": 3}},
            400,
            "reasoning.depth",
        ),
        (
            "max_tokens too big",
            {"model": model, "messages": msg, "max_tokens": 10**6},
            400,
            "max_tokens",
        ),
        (
            "unknown reasoning_effort",
            {"model": model, "messages": msg, "reasoning_effort": "extreme"},
            400,
            "reasoning_effort",
        ),
        (
            "reasoning_effort against reasoning.tier",
            {"model": model, "messages": msg, "reasoning_effort": "low", "reasoning": {"tier": "high"}},
            400,
            "reasoning_effort",
        ),
        (
            "thinking_token_budget for a model that does not think",
            {"model": model, "messages": msg, "thinking_token_budget": 64},
            400,
            "thinking_token_budget",
        ),
        (
            "thinking_token_budget of 0",
            {"model": model, "messages": msg, "thinking_token_budget": 0},
            400,
            "thinking_token_budget",
        ),
        (
            "thinking_token_budget not an integer",
            {"model": model, "messages": msg, "thinking_token_budget": "lots"},
            400,
            "thinking_token_budget",
        ),
        (
            "prompt longer than the context",
            {"model": model, "messages": [{"role": "user", "content": "lorem ipsum " * 3000}]},
            400,
            "messages",
        ),
    ]


@pytest.mark.parametrize("case", range(23))
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(http, app_config, case):
    name, body, status, param = _bad(app_config.engine.model)[case]
    if isinstance(body, bytes):
        resp = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == status, (name, resp.text)
    err = resp.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error", name
    if param is not None:
        assert err["param"] == param, (name, err)
    if name == "prompt longer than the context":
        assert err["code"] == "context_length_exceeded"
        assert "2048" in err["message"]


def test_oversized_body_is_refused_and_server_still_answers(http, app_config, client):
    resp = http.post(
        "/v1/chat/completions",
        content=b"x" * (2 << 20),
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 413 and "error" in resp.json()
    ok = ask(client, app_config.engine.model, {"tier": "low", "max_rounds": 1}, max_tokens=4)
    assert ok.choices[0].message.content


def test_ponder_chat_prints_rounds_and_answer(base_url, capsys):
    from cluster.cli import main

    args = ["chat", "What is 2 + 2?", "--url", base_url, "--tier", "low", "--max-tokens", "8"]
    assert main([*args, "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "[answer]" in out and "tier=low" in out and "round 0:" in out
    assert main([*args, "--stream"]) == 0
    assert "tier=low exit=" in capsys.readouterr().out


def test_ponder_chat_reports_http_errors_and_unreachable_servers(base_url, capsys):
    from cluster.cli import main

    assert main(["chat", "hi", "--url", base_url, "--max-rounds", "99"]) == 1
    assert "HTTP 400" in capsys.readouterr().err
    assert main(["chat", "hi", "--url", "http://127.0.0.1:9"]) == 1
    assert "is `ponder serve` running?" in capsys.readouterr().err


def test_tier_is_scored_from_the_prompt_unless_named(client, http, app_config):
    from services.reasoning.complexity import ComplexityConfig, score

    model = app_config.engine.model
    # as the router loads it: weights fitted to another model give way to the hand-set ones
    complexity, _ = ComplexityConfig.load(app_config.router.complexity_file).for_model(model)
    simple = "Name the capital of France."
    expected = score(simple, complexity)
    summary = ask(client, model, {"max_rounds": 1}, question=simple, max_tokens=4).model_extra["reasoning"]
    assert (summary["tier"], summary["tier_reason"]) == (expected.tier, expected.reason)
    # a medical prompt scores critical: its answer is held for review (HTTP 202)
    medical = "What dosage of ibuprofen is safe for a patient with kidney disease?"
    expected = score(medical, complexity)
    assert expected.tier == "critical" and "medical" in expected.reason
    body = {
        "model": model,
        "messages": [{"role": "user", "content": medical}],
        "max_tokens": 4,
        "temperature": 0,
        "reasoning": {"max_rounds": 1},
    }
    held = http.post("/v1/chat/completions", json=body)
    assert held.status_code == 202, held.text
    summary = held.json()["proposed"]["reasoning"]
    got = (summary["tier"], summary["tier_reason"], summary["domain"])
    assert got == ("critical", expected.reason, "medical")
    named = ask(client, model, {"tier": "high", "max_rounds": 1}, max_tokens=4).model_extra["reasoning"]
    # high's Tree-of-Thought runs only where asked for or shown to pay: here a chain, and it says why
    assert named["tier"] == "high" and named["strategy"] == "cot", named
    assert named["tier_reason"].startswith("requested; chain: no evidence that Tree-of-Thought pays on ")
    tree = ask(client, model, {"tier": "high", "strategy": "tot", "max_rounds": 1}, max_tokens=4)
    assert tree.model_extra["reasoning"]["tier_reason"] == "requested; Tree-of-Thought: requested"
