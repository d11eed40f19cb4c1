"""Ponder's vLLM KV connector on a real engine (SmolLM2 on CPU, in-process, a local store shard):
stored KV really replaces the prefill, a damaged chunk is recomputed, outputs never change.

The store's unit is a chunk of CHUNK tokens (2 of the engine's 32-token blocks here, so these short
prompts span several chunks; the served default is 256): loads and saves count whole chunks."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from kvstore.chain import block_hashes, model_key
from kvstore.codec import PAYLOAD_OFFSET
from kvstore.connector.config import REPORT_KEY, KvConnectorConfig
from services.reasoning.prompts import Message, round_messages

pytestmark = pytest.mark.engine

BLOCK = 32  # the smallest block the CPU attention backend takes
CHUNK = 64  # tokens per store chunk: 2 blocks
MODEL = "smollm2"
KEY = model_key(MODEL, "bfloat16", BLOCK, CHUNK)


def chunk_hashes(ids: list[int]) -> list[str]:
    return block_hashes(KEY, ids, CHUNK)


def whole(ids: list[int]) -> int:
    """Prompt tokens the store can supply: whole chunks, never the last token."""
    return (len(ids) - 1) // CHUNK * CHUNK


@pytest.fixture(scope="module")
def llm(model_dir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    tmp = tmp_path_factory.mktemp("vllm-kv")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: the store is reachable here
        mp.setenv("VLLM_CACHE_ROOT", str(tmp / "cache"))
        mp.setenv("VLLM_RPC_BASE_PATH", str(tmp / "rpc"))
        from vllm import LLM
        from vllm.config import KVTransferConfig

        cfg = KvConnectorConfig(
            model=MODEL, store="local", local_ram_slots=128, prefill_tokens_per_s=50.0, chunk_tokens=CHUNK
        )
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
                kv_connector_module_path="kvstore.connector.vllm_connector",
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
    from kvstore.connector.engine_store import LocalStore, _stores

    (s,) = [s for s in _stores.values() if isinstance(s, LocalStore)]
    return s.shard


def settle(llm=None) -> None:
    """Wait until the engine's asynchronous saves are stored (they run after the step, off it), and
    step the engine until vLLM has freed the blocks it held for them (an offline LLM stops stepping
    when its requests' outputs are out; a served engine keeps stepping by itself)."""
    from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group

    get_kv_transfer_group().path.drain()
    if llm is not None:
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        for _ in range(100):  # each is a real engine step; the copies are done, so one or two do
            if not scheduler.has_requests():
                break
            llm.llm_engine.step()
        assert not scheduler.has_requests(), "vLLM still holds blocks for saves that are done"


def cold(llm) -> None:
    """Empty the engine's local prefix cache: from here only the store can supply a prefix."""
    settle(llm)
    assert llm.reset_prefix_cache() is not False


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
    assert report["loaded_tokens"] == 0 and report["saved_chunks"] >= whole(ids) // CHUNK
    settle()
    stored = store().lookup(chunk_hashes(ids))
    assert stored >= whole(ids) // CHUNK  # every whole chunk of the prompt is in the store
    cold(llm)  # a cold engine: only the store can supply the prefix
    again, report, cached = run(llm, ids, "s-load")
    assert report["loaded_tokens"] == whole(ids) == cached
    cold(llm)
    recomputed, report, cached = run(llm, ids, None)
    assert report is None and cached == 0  # untagged requests are vLLM's alone
    assert first == again == recomputed


def test_generated_tokens_are_saved_for_the_next_round(llm):
    ids = prompt_ids(llm, DOC + "\nList the stages of the port's growth.")
    out, report, _ = run(llm, ids, "s-decode", max_tokens=80)
    # Chunks made whole while decoding are saved too: the next round's prompt starts with them.
    assert report["saved_chunks"] >= (len(ids) + len(out) - 1) // CHUNK
    settle()
    cold(llm)
    follow = ids + out + prompt_ids(llm, "Check that answer.")[1:]
    _, report, _ = run(llm, follow, "s-decode", max_tokens=4)
    assert report["loaded_tokens"] >= (len(ids) + len(out) - 1) // CHUNK * CHUNK


def test_a_damaged_chunk_is_rejected_and_recomputed(llm):
    ids = prompt_ids(llm, DOC + "\nWhat kind of town did it become?")
    first, _, _ = run(llm, ids, "s-corrupt")
    settle()
    shard = store()
    hashes = chunk_hashes(ids)
    victim = shard.core.blocks[hashes[3]]
    # one byte of chunk 3's payload, in its 5th layer piece
    piece = (len(shard.ram.read(victim.slot)) - PAYLOAD_OFFSET) // 30  # SmolLM2 has 30 layers
    shard.ram.buffer[shard.ram.offset(victim.slot) + PAYLOAD_OFFSET + 4 * piece + 5000] ^= 0xFF
    cold(llm)
    again, report, _ = run(llm, ids, "s-corrupt")
    assert report["loaded_tokens"] == 3 * CHUNK  # chunks 0-2 loaded, 3 rejected: recomputed from there
    assert report["load_failed_tokens"] == whole(ids) - 3 * CHUNK
    assert again == first
    settle()
    assert hashes[3] in shard.core.blocks  # the recomputed chunk was saved again, intact
    cold(llm)
    third, report, _ = run(llm, ids, "s-corrupt")
    assert third == first and report["load_failed_tokens"] == 0


def test_loads_that_do_not_pay_are_skipped(llm):
    from kvstore.connector.vllm_connector import _COSTS

    ids = prompt_ids(llm, DOC + "\nWho used the ferry?")
    first, _, _ = run(llm, ids, "s-cost")
    settle()
    cost = _COSTS[KEY]
    saved, cost.margin = cost.margin, 1e12  # a load would have to be a trillion times faster
    try:
        cold(llm)
        again, report, cached = run(llm, ids, "s-cost")
    finally:
        cost.margin = saved
    assert report["decision"] == "recompute_cheaper" and report["loaded_tokens"] == 0 and cached == 0
    assert again == first


def _forged(blob: bytes, **changes) -> bytes:
    """The same block re-encoded with header fields changed (valid checksums: a deliberate forgery)."""
    import dataclasses

    from kvstore.codec import decode, encode

    header, payload = decode(blob, expect_model=KEY, expect_layout=blob_layout(blob))
    return encode(dataclasses.replace(header, **changes), bytes(payload))


def _version_1(blob: bytes) -> bytes:
    """The same chunk written in format 1 (CRC-32s, no padding): must be refused, never misread."""
    import zlib

    import msgpack

    hlen = int.from_bytes(blob[4:8], "big")
    fields = msgpack.unpackb(blob[8 : 8 + hlen])
    payload = blob[PAYLOAD_OFFSET:]
    v1 = {k: v for k, v in fields.items() if k not in ("digests", "header_digest")}
    v1 |= {"v": 1, "payload_crc": zlib.crc32(payload), "header_crc": 0}
    v1["header_crc"] = zlib.crc32(msgpack.packb(v1, use_bin_type=True))
    raw = msgpack.packb(v1, use_bin_type=True)
    return blob[:4] + len(raw).to_bytes(4, "big") + raw + payload


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
    "forged header (another model)": (lambda b: _forged(b, model="other-model|bfloat16|bs32|c64"), "model"),
    "wrong layout": (lambda b: _forged(b, layout="stack0:[1, 2, 3]"), "layout"),
    "wrong dtype": (lambda b: _forged(b, dtype="float16"), "dtype"),
    "another block's address": (lambda b: _forged(b, block_hash=b"\x01" * 32), "header"),
    "truncated payload": (lambda b: b[: len(b) - 4096], "truncated"),
    "an older format (version 1)": (lambda b: _version_1(b), "version"),
    "checksum mismatch": (lambda b: b[:-1] + bytes([b[-1] ^ 0x5A]), "checksum"),
    "oversized declared length": (lambda b: _declared_length(b, 1 << 30), "oversized"),
    "not a block at all": (lambda b: b"\x80\x04\x95" + b[3:], "magic"),  # a pickle's opening bytes
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_blocks_are_rejected_counted_and_recomputed(llm, case):
    from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group

    from kvstore.shard.shard import BlockMeta

    tamper, reason = TAMPERING[case]
    # ~2 chunks and a few tokens out: short, as each case runs the model twice
    ids = prompt_ids(llm, DOC[: len(DOC) // 2] + f"\nCase {case}: how long did the town take to grow?")
    assert len(ids) > 2 * CHUNK
    session = "s-tamper-" + reason.replace(" ", "-") + str(len(case))
    first, _, _ = run(llm, ids, session, max_tokens=8)
    settle()
    shard = store()
    hashes = chunk_hashes(ids)
    (blob,) = shard.get([hashes[1]])
    shard.report_corrupt([hashes[1]])  # drop the honest chunk, put the tampered one at its address
    assert shard.put([BlockMeta(hashes[1], session, 0)], [tamper(blob)]) == 1
    rejected = dict(get_kv_transfer_group().stats["rejected"])
    cold(llm)
    again, report, _ = run(llm, ids, session, max_tokens=8)
    assert report["loaded_tokens"] == CHUNK  # chunk 0 loaded; 1 rejected: recomputed from there
    assert get_kv_transfer_group().stats["rejected"].get(reason, 0) == rejected.get(reason, 0) + 1
    assert again == first
