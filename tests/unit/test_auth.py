"""API keys' pure core: authentication, tiers, request and token windows, and the keys YAML."""

import hashlib
import hmac

import pytest

from services.ingress import auth
from services.ingress.auth import AuthError, KeyEntry, KeyFileError, KeyRing, hash_key, parse_keys, read_keys

RAW = {"alice": "pk-alice-secret", "bob": "pk-bob-secret", "carol": "pk-carol-secret"}
T0 = 1000.0


def entry(name, **kw) -> KeyEntry:
    return KeyEntry(name=name, sha256=hash_key(RAW[name]), **kw)


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing(
        [
            entry("alice"),
            entry("bob", requests_per_minute=3, tiers=("low", "medium")),
            entry("carol", tokens_per_minute=100),
        ]
    )


def refusal(fn, *args) -> AuthError:
    with pytest.raises(AuthError) as info:
        fn(*args)
    return info.value


def test_hash_is_sha256_hex_of_the_stripped_key():
    assert hash_key(" pk-x\n") == hashlib.sha256(b"pk-x").hexdigest()


def test_each_key_authenticates_as_its_entry(ring):
    for name, raw in RAW.items():
        assert ring.authenticate(f"Bearer {raw}").name == name
    assert ring.authenticate(f"bearer   {RAW['bob']}  ").name == "bob"  # scheme is case-insensitive


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "missing_api_key"),
        ("", "missing_api_key"),
        ("Bearer", "missing_api_key"),
        ("Bearer    ", "missing_api_key"),
        ("Bearer pk-wrong", "invalid_api_key"),
        (f"Bearer {RAW['alice']}x", "invalid_api_key"),
        (f"Basic {RAW['alice']}", "invalid_api_key"),
        (RAW["alice"], "invalid_api_key"),  # no scheme
        (f"Bearer {hash_key(RAW['alice'])}", "invalid_api_key"),  # the hash is not the key
    ],
)
def test_missing_or_wrong_keys_are_401(ring, header, code):
    err = refusal(ring.authenticate, header)
    assert (err.status, err.code, err.type) == (401, code, "invalid_request_error")
    assert RAW["alice"] not in err.message and "pk-wrong" not in err.message


def test_keys_are_compared_with_compare_digest_against_every_stored_key(ring, monkeypatch):
    calls, real = [], hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert ring.authenticate(f"Bearer {RAW['alice']}").name == "alice"  # the first key: no early exit
    assert len(calls) == 3
    assert all(isinstance(a, bytes) and len(a) == len(b) == 32 for a, b in calls)
    refusal(ring.authenticate, "Bearer pk-wrong")
    assert len(calls) == 6


def test_tiers_outside_the_keys_list_are_403(ring):
    bob = ring.by_name["bob"]
    ring.authorize(bob, "low")
    ring.authorize(bob, "medium")
    for tier in ("high", "critical"):
        err = refusal(ring.authorize, bob, tier)
        assert (err.status, err.code, err.type, err.param) == (
            403,
            "tier_not_allowed",
            "permission_error",
            "reasoning.tier",
        )
        assert "low, medium" in err.message and tier in err.message
    for tier in ("low", "medium", "high", "critical"):  # default: all tiers
        ring.authorize(ring.by_name["alice"], tier)


def test_request_rate_is_429_after_exactly_n_in_a_minute_then_admitted_after_the_window(ring):
    bob = ring.by_name["bob"]
    for t in (T0, T0 + 10, T0 + 20):
        ring.admit(bob, t)
    err = refusal(ring.admit, bob, T0 + 30)
    assert (err.status, err.code, err.type) == (429, "rate_limit_exceeded", "requests")
    assert err.retry_after == 30  # the first request leaves the window at T0 + 60
    assert "limit 3" in err.message and "used 3" in err.message
    assert refusal(ring.admit, bob, T0 + 59.5).retry_after == 1
    assert ring.used(bob, T0 + 59.5) == (3, 0)  # refusals are not counted
    ring.admit(bob, T0 + 60)  # the first one left the window
    err = refusal(ring.admit, bob, T0 + 60.5)
    assert err.retry_after == 10  # next to leave: T0 + 10
    ring.admit(bob, T0 + 70)
    for t in (T0 + 200, T0 + 200, T0 + 200):  # a quiet minute later: a full allowance again
        ring.admit(bob, t)
    assert refusal(ring.admit, bob, T0 + 200).retry_after == 60


def test_keys_without_limits_are_never_limited_and_hold_no_state(ring):
    alice = ring.by_name["alice"]
    for i in range(10_000):
        ring.admit(alice, T0 + i / 100)
        ring.record_tokens(alice, 1000, T0)
        ring.check_tokens(alice, T0)
    assert ring.tracked() == 0


def test_token_limit_is_429_once_the_last_minutes_tokens_reach_it(ring):
    carol = ring.by_name["carol"]
    ring.check_tokens(carol, T0)
    ring.record_tokens(carol, 60, T0)
    ring.check_tokens(carol, T0 + 1)  # 60 of 100
    ring.record_tokens(carol, 39, T0 + 20)
    ring.check_tokens(carol, T0 + 21)  # 99 of 100
    ring.record_tokens(carol, 1, T0 + 30)
    err = refusal(ring.check_tokens, carol, T0 + 31)
    assert (err.status, err.code, err.type) == (429, "rate_limit_exceeded", "tokens")
    assert err.retry_after == 29  # the 60 tokens of T0 leave at T0 + 60: 40 < 100
    assert "limit 100" in err.message and "used 100" in err.message
    ring.check_tokens(carol, T0 + 60)
    assert ring.used(carol, T0 + 60) == (0, 40)


def test_idle_keys_are_dropped_and_windows_stay_bounded(ring):
    bob, carol = ring.by_name["bob"], ring.by_name["carol"]
    ring.admit(bob, T0)
    ring.record_tokens(carol, 5, T0)
    assert ring.tracked() == 2
    ring.sweep(T0 + 59)
    assert ring.tracked() == 2
    ring.sweep(T0 + 60)
    assert ring.tracked() == 0
    for s in range(1000):  # one token a second for 1000 s: never more than a minute of buckets
        ring.record_tokens(carol, 1, T0 + s)
    assert len(ring._usage["carol"].tokens.buckets) == auth.WINDOW_S


def test_a_clock_stepping_back_does_not_break_the_window(ring):
    carol = ring.by_name["carol"]
    ring.record_tokens(carol, 50, T0 + 10)
    ring.record_tokens(carol, 50, T0)  # counted in the newest bucket
    assert refusal(ring.check_tokens, carol, T0 + 11).retry_after == 59


# --- the keys YAML ---------------------------------------------------------------------------------

GOOD = f"""
keys:
  - name: alice
    sha256: {hash_key(RAW["alice"])}
  - name: bob.ci-1
    sha256: {hash_key(RAW["bob"]).upper()}
    requests_per_minute: 30
    tokens_per_minute: 5000
    tiers: [low, medium]
"""


def test_a_keys_document_parses_to_entries():
    alice, bob = parse_keys(GOOD, "keys.yaml")
    assert alice.tiers == ("low", "medium", "high", "critical") and alice.requests_per_minute is None
    assert bob.name == "bob.ci-1" and bob.sha256 == hash_key(RAW["bob"])  # stored lower-case
    assert (bob.requests_per_minute, bob.tokens_per_minute, bob.tiers) == (30, 5000, ("low", "medium"))
    assert parse_keys("", "empty") == [] and parse_keys("keys: []", "none") == []


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        (
            "keys:\n  - name: alice\n    sha256: abc123\n",
            ["keys[0] (name 'alice').sha256", "64 hex", "6 characters"],
        ),
        (
            "keys:\n  - name: alice\n    sha256: " + "g" * 64 + "\n",
            ["keys[0] (name 'alice').sha256", "64 hex"],
        ),
        (
            f"keys:\n  - name: a\n    sha256: {hash_key('x')}\n  - name: b\n    sha256: pk-oops\n",
            ["keys[1] (name 'b')", "raw key"],
        ),
        (
            f"keys:\n  - name: a\n    sha256: {hash_key('x')}\n  - name: a\n    sha256: {hash_key('y')}\n",
            ["duplicate key name 'a'", "keys[0]", "keys[1]"],
        ),
        (
            f"keys:\n  - name: a\n    sha256: {hash_key('x')}\n  - name: b\n    sha256: {hash_key('x')}\n",
            ["listed twice", "keys[0]", "keys[1]", "'b'"],
        ),
        (
            f"keys:\n  - name: a\n    sha256: {hash_key('x')}\n    tiers: [low, extreme]\n",
            ["keys[0] (name 'a').tiers.1"],
        ),
        (f"keys:\n  - name: a\n    sha256: {hash_key('x')}\n    tiers: []\n", ["keys[0] (name 'a').tiers"]),
        (
            f"keys:\n  - name: a\n    sha256: {hash_key('x')}\n    requests_per_minute: 0\n",
            ["requests_per_minute"],
        ),
        (
            f"keys:\n  - name: a\n    sha256: {hash_key('x')}\n    key: pk-raw\n",
            ["keys[0] (name 'a').key", "Extra inputs"],
        ),
        (f"keys:\n  - name: has space\n    sha256: {hash_key('x')}\n", ["keys[0]", "name"]),
        (f"keys:\n  - sha256: {hash_key('x')}\n", ["keys[0].name", "Field required"]),
        ("api_keys: []\n", ["api_keys", "Extra inputs"]),
        ("keys: [\n", ["not valid YAML at line"]),
    ],
)
def test_bad_keys_documents_fail_naming_the_entry(text, needles):
    with pytest.raises(KeyFileError) as info:
        parse_keys(text, "keys.yaml")
    msg = str(info.value)
    assert msg.startswith("keys.yaml: ") or "duplicate" in msg or "twice" in msg
    for needle in needles:
        assert needle in msg, msg
    assert "pk-oops" not in msg and "pk-raw" not in msg  # values are never echoed


def test_keys_come_from_a_file_an_environment_variable_or_both(tmp_path):
    f = tmp_path / "keys.yaml"
    f.write_text(f"keys:\n  - name: a\n    sha256: {hash_key('x')}\n")
    env = {"PONDER_KEYS": f"keys:\n  - name: b\n    sha256: {hash_key('y')}\n"}
    assert read_keys(None, None, env) == []  # no authentication
    assert [k.name for k in read_keys(str(f), None, env)] == ["a"]
    assert [k.name for k in read_keys(None, "PONDER_KEYS", env)] == ["b"]
    assert [k.name for k in read_keys(str(f), "PONDER_KEYS", env)] == ["a", "b"]
    env["PONDER_KEYS"] = f"keys:\n  - name: a\n    sha256: {hash_key('z')}\n"
    with pytest.raises(KeyFileError, match="duplicate key name 'a'.*api_keys_file.*api_keys_env"):
        read_keys(str(f), "PONDER_KEYS", env)
    with pytest.raises(KeyFileError, match=r"\$MISSING: the environment variable is not set"):
        read_keys(None, "MISSING", env)
    with pytest.raises(KeyFileError, match="cannot read"):
        read_keys(str(tmp_path / "nope.yaml"), None, env)
    with pytest.raises(KeyFileError, match="lists no keys"):
        read_keys(None, "EMPTY", {"EMPTY": ""})
