"""Ponder's vLLM KV connector on a real engine (SmolLM2 on CPU, in-process, a local store shard):
stored KV really replaces the prefill, a damaged block is recomputed, outputs never change."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from kvstore.chain import block_hashes, model_key
from kvstore.connector_config import REPORT_KEY, KvConnectorConfig
from services.reasoning.prompts import Message, round_messages

pytestmark = pytest.mark.engine

BLOCK = 32  # the smallest block the CPU attention backend takes
MODEL = "smollm2"


@pytest.fixture(scope="module")
def llm(model_dir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    tmp = tmp_path_factory.mktemp("vllm-kv")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: the store is reachable here
        mp.setenv("VLLM_CACHE_ROOT", str(tmp / "cache"))
        mp.setenv("VLLM_RPC_BASE_PATH", str(tmp / "rpc"))
        from vllm import LLM
        from vllm.config import KVTransferConfig

        cfg = KvConnectorConfig(model=MODEL, store="local", local_ram_slots=128, prefill_tokens_per_s=50.0)
        engine = LLM(
            model=str(model_dir),
            dtype="bfloat16",
            max_model_len=2048,
            kv_cache_memory_bytes=128 << 20,
            enforce_eager=True,
            block_size=BLOCK,
            seed=0,
            kv_transfer_config=KVTransferConfig(
                kv_connector="PonderKVConnector",
                kv_connector_module_path="kvstore.connector",
                kv_role="kv_both",
                kv_load_failure_policy="recompute",
                kv_connector_extra_config=cfg.to_extra_config(),
            ),
        )
        try:
            yield engine
        finally:
            from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

            del engine
            ensure_kv_transfer_shutdown()  # process-global: later in-process engines must not see it
            gc.collect()


def store():
    from kvstore.engine_store import LocalStore, _stores

    (s,) = [s for s in _stores.values() if isinstance(s, LocalStore)]
    return s.shard


def prompt_ids(llm, text: str) -> list[int]:
    tok = llm.get_tokenizer()
    rendered = tok.apply_chat_template(
        [m.as_dict() for m in round_messages([Message("user", text)], [])],
        add_generation_prompt=True,
        tokenize=False,
    )
    return list(tok(rendered, add_special_tokens=False)["input_ids"])


def run(llm, ids: list[int], session: str | None, max_tokens: int = 24):
    from vllm import SamplingParams

    extra = {"ponder_kv": {"session": session, "round": 0, "branch": ""}} if session else None
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=extra)
    (out,) = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
    report = (out.kv_transfer_params or {}).get(REPORT_KEY)
    return list(out.outputs[0].token_ids), report, out.num_cached_tokens


DOC = "The river port grew from a ferry crossing into a market town over two centuries. " * 14


def test_loaded_kv_replaces_the_prefill_and_changes_nothing(llm):
    ids = prompt_ids(llm, DOC + "\nIn one sentence, what did the port grow from?")
    first, report, _ = run(llm, ids, "s-load")
    assert report["loaded_tokens"] == 0 and report["saved_blocks"] >= (len(ids) - 1) // BLOCK
    stored = store().lookup(block_hashes(model_key(MODEL, "bfloat16", BLOCK), ids, BLOCK))
    assert stored >= (len(ids) - 1) // BLOCK  # every whole prompt block is in the store
    llm.reset_prefix_cache()  # a cold engine: only the store can supply the prefix
    again, report, cached = run(llm, ids, "s-load")
    whole = (len(ids) - 1) // BLOCK * BLOCK
    assert report["loaded_tokens"] == whole == cached
    llm.reset_prefix_cache()
    recomputed, report, cached = run(llm, ids, None)
    assert report is None and cached == 0  # untagged requests are vLLM's alone
    assert first == again == recomputed


def test_generated_tokens_are_saved_for_the_next_round(llm):
    ids = prompt_ids(llm, DOC + "\nList the stages of the port's growth.")
    out, report, _ = run(llm, ids, "s-decode", max_tokens=80)
    # Blocks made full while decoding are saved too: the next round's prompt starts with them.
    assert report["saved_blocks"] >= (len(ids) + len(out) - 1) // BLOCK
    llm.reset_prefix_cache()
    follow = ids + out + prompt_ids(llm, "Check that answer.")[1:]
    _, report, _ = run(llm, follow, "s-decode", max_tokens=4)
    assert report["loaded_tokens"] >= (len(ids) + len(out) - 1) // BLOCK * BLOCK


def test_a_damaged_block_is_rejected_and_recomputed(llm):
    ids = prompt_ids(llm, DOC + "\nWhat kind of town did it become?")
    first, _, _ = run(llm, ids, "s-corrupt")
    shard = store()
    hashes = block_hashes(model_key(MODEL, "bfloat16", BLOCK), ids, BLOCK)
    victim = shard.core.blocks[hashes[3]]
    shard.ram.buffer[shard.ram.offset(victim.slot) + 4 + 5000] ^= 0xFF  # one byte of block 3's payload
    llm.reset_prefix_cache()
    again, report, _ = run(llm, ids, "s-corrupt")
    assert report["loaded_tokens"] == 3 * BLOCK  # blocks 0-2 loaded, 3 rejected: recomputed from there
    assert report["load_failed_tokens"] == (len(ids) - 1) // BLOCK * BLOCK - 3 * BLOCK
    assert again == first
    assert hashes[3] in shard.core.blocks  # the recomputed block was saved again, intact
    llm.reset_prefix_cache()
    third, report, _ = run(llm, ids, "s-corrupt")
    assert third == first and report["load_failed_tokens"] == 0


def test_loads_that_do_not_pay_are_skipped(llm):
    from kvstore.connector import _COSTS

    ids = prompt_ids(llm, DOC + "\nWho used the ferry?")
    first, _, _ = run(llm, ids, "s-cost")
    cost = _COSTS[model_key(MODEL, "bfloat16", BLOCK)]
    saved, cost.margin = cost.margin, 1e12  # a load would have to be a trillion times faster
    try:
        llm.reset_prefix_cache()
        again, report, cached = run(llm, ids, "s-cost")
    finally:
        cost.margin = saved
    assert report["decision"] == "recompute_cheaper" and report["loaded_tokens"] == 0 and cached == 0
    assert again == first


def _forged(blob: bytes, **changes) -> bytes:
    """The same block re-encoded with header fields changed (valid checksums: a deliberate forgery)."""
    import dataclasses

    from kvstore.codec import decode, encode

    key = model_key(MODEL, "bfloat16", BLOCK)
    header, payload = decode(blob, expect_model=key, expect_layout=blob_layout(blob))
    return encode(dataclasses.replace(header, **changes), bytes(payload))


def blob_layout(blob: bytes) -> str:
    import msgpack

    return msgpack.unpackb(blob[8 : 8 + int.from_bytes(blob[4:8], "big")])["layout"]


def _declared_length(blob: bytes, n: int) -> bytes:
    """The header's length prefix (bytes 4-8) rewritten to `n`."""
    return blob[:4] + n.to_bytes(4, "big") + blob[8:]


# Issue 7, KV tampering: each class of damage is rejected by the loader, counted by reason and
# recomputed with the same greedy output. Nothing in a block is ever executed or unpickled: the
# header is msgpack with extension types refused, the payload raw bytes (kvstore/codec.py).
TAMPERING = {
    "forged header (another model)": (lambda b: _forged(b, model="other-model|bfloat16|32"), "model"),
    "wrong layout": (lambda b: _forged(b, layout="stack0:[1, 2, 3]"), "layout"),
    "wrong dtype": (lambda b: _forged(b, dtype="float16"), "dtype"),
    "another block's address": (lambda b: _forged(b, block_hash=b"\x01" * 32), "header"),
    "truncated payload": (lambda b: b[: len(b) - 4096], "truncated"),
    "checksum mismatch": (lambda b: b[:-1] + bytes([b[-1] ^ 0x5A]), "checksum"),
    "oversized declared length": (lambda b: _declared_length(b, 1 << 30), "oversized"),
    "not a block at all": (lambda b: b"\x80\x04\x95" + b[3:], "magic"),  # a pickle's opening bytes
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_blocks_are_rejected_counted_and_recomputed(llm, case):
    from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group

    from kvstore.shard import BlockMeta

    tamper, reason = TAMPERING[case]
    # ~4 blocks and a few tokens out: short, as each case runs the model twice
    ids = prompt_ids(llm, DOC[: len(DOC) // 2] + f"\nCase {case}: how long did the town take to grow?")
    assert len(ids) > 3 * BLOCK
    session = "s-tamper-" + reason
    first, _, _ = run(llm, ids, session, max_tokens=8)
    shard = store()
    hashes = block_hashes(model_key(MODEL, "bfloat16", BLOCK), ids, BLOCK)
    (blob,) = shard.get([hashes[2]])
    shard.report_corrupt([hashes[2]])  # drop the honest block, put the tampered one at its address
    assert shard.put([BlockMeta(hashes[2], session, 0)], [tamper(blob)]) == 1
    rejected = dict(get_kv_transfer_group().stats["rejected"])
    llm.reset_prefix_cache()
    again, report, _ = run(llm, ids, session, max_tokens=8)
    assert report["loaded_tokens"] == 2 * BLOCK  # blocks 0-1 loaded; 2 rejected: recomputed from there
    assert get_kv_transfer_group().stats["rejected"].get(reason, 0) == rejected.get(reason, 0) + 1
    assert again == first
