"""API keys over HTTP without Ray: the router's real middleware, error handlers, tier check and
session accounting (services/ingress/chat.py) on a FastAPI app whose chat route stands in for the
loop; the config contract the Helm chart relies on, and `ponder keys`."""

import logging

import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from cluster import cli
from services.config import DEFAULT_CONFIG, AppConfig, AuthConfig
from services.control.client import Control
from services.ingress import access, chat
from services.ingress.api import install_error_handlers
from services.ingress.auth import KeyEntry, KeyRing, hash_key
from services.ingress.metrics import log_request
from services.loop.events import Finished
from services.loop.orchestrator import Outcome
from services.reasoning.loop import RoundRecord
from services.reasoning.tiers import Reason, RoundPlan

FULL, LOW_ONLY, LIMITED = "pk-full-0123456789", "pk-low-0123456789", "pk-limited-0123456789"


def make_app(ring: KeyRing | None) -> FastAPI:
    """What the router does: the middleware, then per-request tier and token checks and a log line."""
    app = FastAPI()
    install_error_handlers(app)
    access.install(app)
    app.state.auth = ring

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": []}

    class Quiet:  # where metrics would go; the accounting itself is the router's
        def __getattr__(self, name):
            return lambda *a, **k: None

    accounting = chat.Accounting(Quiet(), Quiet(), Quiet(), ring, "general")

    @app.post("/v1/chat/completions")
    async def chat_route(request: Request, tier: str = "low", tokens: int = 5):
        if (refused := access.check_chat(ring, access.caller(request), tier)) is not None:
            return refused  # what the router's chat route does before it runs the loop
        name, plan = access.key_id(request), RoundPlan(tier, 1, 2, 0.8)
        answer = RoundRecord(0, "4", 3, tokens, 0, 0.9, 1.0, 1.0)
        loop = _events([Finished(Outcome(plan, [answer], Reason.CEILING, "4", ""))])
        async for _ in chat.accounted(accounting, "chatcmpl-1", name, loop, Control(), plan):
            pass  # logged and counted against the key by the real accounting
        return {"key": name}

    return app


async def _events(items):
    for x in items:
        yield x


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing(
        [
            KeyEntry(name="full", sha256=hash_key(FULL)),
            KeyEntry(name="low-only", sha256=hash_key(LOW_ONLY), tiers=("low",), tokens_per_minute=10),
            KeyEntry(name="limited", sha256=hash_key(LIMITED), requests_per_minute=2),
        ]
    )


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def openai_error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]
    return err


def test_without_keys_nothing_is_checked_and_callers_get_the_hashed_id():
    c = TestClient(make_app(None))
    assert c.post("/v1/chat/completions").json() == {"key": "anonymous"}
    assert c.post("/v1/chat/completions", headers=bearer("whatever")).json()["key"].startswith("key-")


def test_refusals_are_openai_shaped_with_their_headers(ring):
    c = TestClient(make_app(ring))
    r = c.get("/v1/models")
    openai_error(r, 401, "missing_api_key")
    assert r.headers["www-authenticate"].startswith("Bearer")
    openai_error(c.get("/v1/models", headers=bearer("pk-wrong")), 401, "invalid_api_key")
    openai_error(c.get("/v1/models", headers={"Authorization": f"Basic {FULL}"}), 401, "invalid_api_key")
    openai_error(c.get("/v1/nothing-here"), 401, "missing_api_key")  # deny by default, even a 404
    assert c.get("/healthz").status_code == 200 and c.get("/openapi.json").status_code == 200
    assert c.post("/v1/chat/completions", headers=bearer(FULL), params={"tier": "critical"}).json() == {
        "key": "full"
    }
    err = openai_error(
        c.post("/v1/chat/completions", headers=bearer(LOW_ONLY), params={"tier": "high"}),
        403,
        "tier_not_allowed",
    )
    assert err["type"] == "permission_error" and err["param"] == "reasoning.tier"


def test_request_rate_and_token_limits_are_429_with_retry_after(ring):
    c = TestClient(make_app(ring))
    assert [c.get("/v1/models", headers=bearer(LIMITED)).status_code for _ in range(2)] == [200, 200]
    r = c.get("/v1/models", headers=bearer(LIMITED))
    assert openai_error(r, 429, "rate_limit_exceeded")["type"] == "requests"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert c.get("/v1/models", headers=bearer(FULL)).status_code == 200  # other keys are unaffected
    ok = c.post("/v1/chat/completions", headers=bearer(LOW_ONLY), params={"tokens": 10})
    assert ok.status_code == 200
    r = c.post("/v1/chat/completions", headers=bearer(LOW_ONLY))
    assert openai_error(r, 429, "rate_limit_exceeded")["type"] == "tokens"
    assert 1 <= int(r.headers["retry-after"]) <= 60


def test_logs_name_the_key_and_never_carry_a_key_or_its_hash(ring, caplog):
    c = TestClient(make_app(ring))
    with caplog.at_level(logging.DEBUG):  # everything any library logs, at every level
        c.post("/v1/chat/completions", headers=bearer(FULL))
        c.post("/v1/chat/completions", headers=bearer(LOW_ONLY), params={"tier": "high"})
        c.get("/v1/models", headers=bearer("pk-wrong-but-secret"))
        c.get("/v1/models", headers={"Authorization": f"Basic {FULL}"})
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        line.startswith("request request_id=chatcmpl-1 session=chatcmpl-1 api_key=full ") for line in lines
    )
    text = "\n".join(lines) + caplog.text
    for secret in (FULL, LOW_ONLY, "pk-wrong-but-secret", hash_key(FULL), "Bearer", "Authorization"):
        assert secret not in text


def test_log_request_without_authentication_names_no_key(caplog):
    plan = RoundPlan("low", 1, 2, 0.8)
    with caplog.at_level(logging.INFO, logger="ponder.requests"):
        log_request("chatcmpl-2", plan, Outcome(plan, [], Reason.CEILING, "", ""), "ok", None)
    assert " api_key=- " in caplog.records[0].getMessage()


# --- config ----------------------------------------------------------------------------------------


def write_config(tmp_path, auth: dict) -> str:
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for section, field in (("depth_control", "tiers_file"), ("depth_control", "domains_file")):
        raw[section][field] = str(DEFAULT_CONFIG.parent / f"{field.removesuffix('_file')}.yaml")
    raw["router"]["complexity_file"] = str(DEFAULT_CONFIG.parent / "complexity.yaml")
    raw["depth_control"]["state_dir"] = str(tmp_path / "state")
    raw["auth"] = auth
    path = tmp_path / "cfg" / "app.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_auth_config_contract():
    assert set(AuthConfig.model_fields) == {"api_keys_file", "api_keys_env"}
    assert all(f.description for f in AuthConfig.model_fields.values())
    assert AuthConfig().api_keys_file is None and AuthConfig().api_keys_env is None
    assert AppConfig.load(DEFAULT_CONFIG).auth == AuthConfig()  # the local default: no keys
    with pytest.raises(ValueError, match="Extra inputs"):
        AuthConfig.model_validate({"api_keys": ["pk-raw"]})
    with pytest.raises(ValueError, match="pattern"):
        AuthConfig(api_keys_env="NOT A NAME")


def test_keys_file_resolves_against_the_config_folder_and_is_checked_at_load(tmp_path, monkeypatch):
    keys = tmp_path / "cfg" / "keys.yaml"
    keys.parent.mkdir()
    keys.write_text(f"keys:\n  - name: ci\n    sha256: {hash_key(FULL)}\n")
    cfg = AppConfig.load(write_config(tmp_path, {"api_keys_file": "keys.yaml"}))
    assert cfg.auth.api_keys_file == str(keys.resolve())
    assert [k.name for k in access.load(cfg.auth).keys] == ["ci"]

    missing = write_config(tmp_path, {"api_keys_file": "absent.yaml"})
    with pytest.raises(FileNotFoundError, match="auth.api_keys_file not found: .*absent.yaml"):
        AppConfig.load(missing)
    with pytest.raises(cli.CliError, match="auth.api_keys_file not found"):
        cli.load_config(missing)

    keys.write_text("keys:\n  - name: ci\n    sha256: pk-pasted-by-mistake\n")
    with pytest.raises(cli.CliError, match=r"keys\[0\] \(name 'ci'\).sha256: looks like a raw key") as info:
        cli.load_config(write_config(tmp_path, {"api_keys_file": "keys.yaml"}))
    assert "pk-pasted-by-mistake" not in str(info.value)

    env_only = write_config(tmp_path, {"api_keys_env": "PONDER_TEST_KEYS"})
    monkeypatch.delenv("PONDER_TEST_KEYS", raising=False)
    with pytest.raises(cli.CliError, match=r"\$PONDER_TEST_KEYS: the environment variable is not set"):
        cli.load_config(env_only)
    monkeypatch.setenv(
        "PONDER_TEST_KEYS", f"keys:\n  - name: from-secret\n    sha256: {hash_key(LOW_ONLY)}\n"
    )
    assert [k.name for k in access.load(AppConfig.load(env_only).auth).keys] == ["from-secret"]


# --- ponder keys ------------------------------------------------------------------------------------


def test_ponder_keys_new_prints_a_key_once_and_an_entry_that_authenticates_it(capsys):
    assert cli.main(["keys", "new", "ci-bot", "--requests-per-minute", "30", "--tiers", "low,medium"]) == 0
    out = capsys.readouterr().out
    key = next(line.strip() for line in out.splitlines() if line.strip().startswith("pk-"))
    assert len(key) == len("pk-") + 43 and out.count(key) == 1
    entries = yaml.safe_load(out[out.index("- name:") :])
    assert entries == [
        {"name": "ci-bot", "sha256": hash_key(key), "requests_per_minute": 30, "tiers": ["low", "medium"]}
    ]
    ring = KeyRing([KeyEntry(**e) for e in entries])
    assert ring.authenticate(f"Bearer {key}").name == "ci-bot"
    assert cli.main(["keys", "new", "ci-bot"]) == 0
    assert key not in capsys.readouterr().out  # a fresh key every time
    assert cli.main(["keys", "new", "bad name"]) == 1
    assert "name" in capsys.readouterr().err


def test_ponder_keys_hash_reads_stdin(capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(FULL + "\n"))
    assert cli.main(["keys", "hash"]) == 0
    assert capsys.readouterr().out.strip() == hash_key(FULL)
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert cli.main(["keys", "hash"]) == 1


def test_ponder_log_lines_reach_the_serve_replica_log_handlers():
    from services.ingress.metrics import send_logs_to_replica_log

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    serve, ponder = logging.getLogger("ray.serve"), logging.getLogger("ponder")
    saved = (serve.handlers[:], ponder.handlers[:], ponder.level, ponder.propagate)
    keep = Keep()
    try:
        serve.handlers[:] = []
        send_logs_to_replica_log()  # outside a replica: nothing changes
        assert ponder.handlers == saved[1] and ponder.level == saved[2]
        serve.handlers[:] = [keep]
        send_logs_to_replica_log()
        send_logs_to_replica_log()  # idempotent
        plan = RoundPlan("low", 1, 2, 0.8)
        log_request("chatcmpl-3", plan, None, "ok", None, api_key="ci")
        assert len(keep.lines) == 1 and " api_key=ci " in keep.lines[0]
    finally:
        serve.handlers[:], ponder.handlers[:] = saved[0], saved[1]
        ponder.setLevel(saved[2])
        ponder.propagate = saved[3]
