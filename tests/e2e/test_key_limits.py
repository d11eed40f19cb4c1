"""A key's own limits hold for the whole cluster (issue 18): with two router replicas, a key allowed 3
chat requests a minute gets exactly 3, whichever replicas its requests reach. Depth control counts
them at admission, the one call a request makes to it anyway (services/reasoning/budgets.limit_key);
each replica alone would have allowed 3."""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
import pytest
import yaml

from cluster.keys import new_key
from cluster.local import free_port, running
from services.ingress.auth import hash_key

pytestmark = pytest.mark.e2e
LIMIT = 3


@pytest.fixture(scope="module")
def served(app_config):
    key = new_key()
    cfg = app_config.model_copy(deep=True)
    cfg.router.num_replicas = 2
    cfg.kvstore.enabled = False
    cfg.http.port, cfg.ray.metrics_export_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "keys.yaml"
        entries = [{"name": "three-per-minute", "sha256": hash_key(key), "requests_per_minute": LIMIT}]
        path.write_text(yaml.safe_dump({"keys": entries}))
        cfg.auth.api_keys_file = str(path)
        with running(cfg, progress=lambda m: print(m, flush=True)) as url:
            yield cfg, url, key


def test_two_routers_allow_a_key_its_limit_once_not_twice(served):
    cfg, url, key = served
    body = {
        "model": cfg.engine.model,
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 1,
        "reasoning": {"tier": "low", "max_rounds": 1},
    }
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as c:
        codes, refusals = [], []
        for _ in range(3 * LIMIT):
            r = c.post("/v1/chat/completions", json=body)
            codes.append(r.status_code)
            if r.status_code == 429:
                refusals.append(r)
    assert codes.count(200) == LIMIT and codes.count(429) == 2 * LIMIT, codes
    assert codes[:LIMIT] == [200] * LIMIT  # the first ones in the minute, then none
    for r in refusals:
        err = r.json()["error"]
        assert (err["code"], err["type"]) == ("rate_limit_exceeded", "requests") and "limit 3" in err[
            "message"
        ]
        assert 1 <= int(r.headers["retry-after"]) <= 60
