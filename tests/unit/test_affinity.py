"""Session affinity policy (services/worker/affinity.py) and block sizing (kvstore/shard/sizing.py)."""

import json

import pytest

from kvstore.shard.sizing import block_payload_bytes
from services.worker.affinity import moves_holder, rank, session_of
from services.worker.engine import SamplingSpec


def test_holder_first_unless_busy_then_least_loaded():
    queues = {"a": 2, "b": 0, "c": 1}
    assert rank("a", queues, max_queue=4) == [["a"], ["b"], ["c"]]
    assert rank("a", queues, max_queue=2) == [["b"], ["c"], ["a"]]  # busy holder: spill, store serves
    assert rank(None, queues, max_queue=4) == [["b"], ["c"], ["a"]]
    assert rank("gone", queues, max_queue=4) == [["b"], ["c"], ["a"]]  # holder's replica died
    assert rank("a", {"a": 0, "b": 0}, max_queue=0) == [["b"], ["a"]]  # 0: always spread
    assert rank("x", {"b": 1, "a": 1}, 4) == [["a"], ["b"]]  # ties: by id, reproducible
    assert rank("a", queues, max_queue=2, follow=True) == [["a"], ["b"], ["c"]]  # a closing: its round's
    assert rank("a", {"a": 0, "b": 0}, max_queue=0, follow=True) == [["a"], ["b"]]
    assert rank("gone", queues, max_queue=4, follow=True) == [["b"], ["c"], ["a"]]


def test_session_is_the_calls_session_keyword():
    assert session_of({"session": "s"}) == "s"
    assert session_of({"session": None}) is None and session_of({"session": ""}) is None
    assert session_of({}) is None and session_of(None) is None
    assert session_of({"session": 3}) is None  # not a session id: routed like an untagged call


def test_a_following_call_goes_to_the_holder_without_moving_it():
    round_ = SamplingSpec(max_tokens=8, kv_tags=("s", 1, ""))
    closing = SamplingSpec(max_tokens=8, affinity="s")  # a round's closing, a thinking probe
    assert round_.session == closing.session == "s"
    assert not round_.follows and closing.follows and not SamplingSpec(max_tokens=8).follows
    assert moves_holder({"session": "s", "follow": round_.follows})
    assert not moves_holder({"session": "s", "follow": closing.follows})
    assert not moves_holder({"session": None}) and not moves_holder({})


def test_block_bytes_from_the_model_config(tmp_path):
    cfg = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert block_payload_bytes(tmp_path, 32) == 30 * 2 * 3 * 64 * 32 * 2  # SmolLM2-135M: 737,280
    assert block_payload_bytes(tmp_path, 16, "float32") == 30 * 2 * 3 * 64 * 16 * 4
    with pytest.raises(ValueError):
        block_payload_bytes(tmp_path, 16, "int3")
