"""The connector's scheduler-side bookkeeping (kvstore/planner.py), the block chain and the cost model."""

import pytest

from kvstore.chain import BlockChain, block_hashes, model_key
from kvstore.cost import CostModel
from kvstore.planner import KvTags, Planner

BS = 4
KEY = model_key("m", "torch.bfloat16", BS)
TAGS = KvTags("s1", 1, "")


def planner(stored: int, cost: CostModel | None = None, calls: list | None = None) -> Planner:
    """A planner whose store holds the first `stored` blocks of any prompt."""

    def lookup(session: str, hashes: list[str]) -> int:
        if calls is not None:
            calls.append((session, list(hashes)))
        return min(stored, len(hashes))

    return Planner(KEY, BS, 1000, lookup, cost or CostModel(prefill_tokens_per_s=1.0))


def test_chain_is_deterministic_prefix_stable_and_model_scoped():
    toks = list(range(10))
    a = block_hashes(KEY, toks, BS)
    assert len(a) == 2 and a == block_hashes(KEY, toks + [99], BS)  # partial block has no address
    assert block_hashes(KEY, [0, 1, 2, 3], BS) == a[:1]
    assert block_hashes(KEY, [0, 1, 2, 5, 4, 5, 6, 7], BS)[1] != a[1]  # the chain carries the past
    assert block_hashes(model_key("other", "bfloat16", BS), toks, BS) != a
    assert model_key("m", "torch.bfloat16", 4) == model_key("m", "bfloat16", 4)
    chain = BlockChain(KEY, BS)
    assert chain.extend(toks, 1) == a[:1] and chain.extend(toks, 2) == a
    with pytest.raises(ValueError):
        chain.extend(toks, 3)


def test_tags_are_validated():
    assert KvTags.from_extra_args(TAGS.as_extra_args()) == TAGS
    for bad in (
        None,
        {},
        {"ponder_kv": "x"},
        {"ponder_kv": {"session": ""}},
        {"ponder_kv": {"session": "s", "round": -1}},
        {"ponder_kv": {"session": "s", "round": True}},
        {"ponder_kv": {"session": "s" * 300}},
        {"ponder_kv": {"session": "s", "branch": 3}},
    ):
        assert KvTags.from_extra_args(bad) is None


def test_match_loads_whole_blocks_beyond_the_local_hit_and_never_the_last_token():
    calls = []
    p = planner(stored=5, calls=calls)
    prompt = list(range(13))  # 3 full blocks; the 13th token must be computed
    assert p.match("r", TAGS, lambda: prompt, num_computed=4) == 8  # blocks 1-2 (block 0 is local)
    assert calls[0][0] == "s1" and len(calls[0][1]) == 3
    prompt12 = list(range(12))  # exactly 3 blocks: the last block holds the last token, so only 2
    assert p.match("r2", TAGS, lambda: prompt12, num_computed=0) == 8
    assert p.match("r3", None, lambda: prompt, num_computed=0) == 0  # untagged: vLLM alone
    assert "r3" not in p.reqs


def test_step_plans_the_load_then_saves_completed_blocks_once():
    p = planner(stored=2)
    tokens = list(range(10))
    assert p.match("r", TAGS, lambda: tokens, 0) == 8
    p.allocated("r", 8)
    plan = p.step([("r", [7, 8, 9], 0 + 8, 2)], [])
    (load,) = plan.loads
    assert load.block_ids == [7, 8] and load.hashes == block_hashes(KEY, tokens, BS)[:2]
    assert plan.saves == [] and plan.computed_tokens == 2  # block 2 is not full yet
    tokens += [10, 11]  # decoding: two more tokens make block 2 full after the next step
    plan = p.step([], [("r", None, False, 10, 1)])
    assert plan.saves == []
    plan = p.step([], [("r", [12], False, 11, 1)])
    (save,) = plan.saves
    assert save.block_ids == [9] and save.hashes == [block_hashes(KEY, tokens, BS)[2]]
    assert p.step([], [("r", None, False, 12, 1)]).saves == []  # saved once
    assert p.finished("r") == (
        True,  # it had a save: vLLM keeps its blocks until the worker has copied them
        {
            "loaded_tokens": 8,
            "load_failed_tokens": 0,
            "saved_blocks": 1,
            "saved_chunks": 1,
            "decision": "load",
        },
    )
    assert p.finished("r") == (False, None)


def test_scheduler_taking_fewer_external_tokens_shrinks_the_load():
    p = planner(stored=3)
    tokens = list(range(16))
    assert p.match("r", TAGS, lambda: tokens, 0) == 12
    p.allocated("r", 4)
    (load,) = p.step([("r", [1, 2, 3, 4], 4, 12)], []).loads
    assert load.block_ids == [1]
    p2 = planner(stored=3)
    p2.match("q", TAGS, lambda: tokens, 0)
    p2.allocated("q", 0)
    assert p2.step([("q", [1, 2, 3, 4], 0, 16)], []).loads == []


def test_a_failed_load_counts_and_resaves_from_the_first_bad_block():
    p = planner(stored=3)
    tokens = list(range(13))
    p.match("r", TAGS, lambda: tokens, 0)
    p.allocated("r", 12)
    p.step([("r", [5, 6, 7, 8], 12, 1)], [])
    p.load_failed({6})  # block 1 bad: vLLM recomputes blocks 1 and 2
    plan = p.step([], [("r", None, False, 4, 9)])  # recompute runs
    (save,) = plan.saves
    assert save.block_ids == [6, 7]
    _, report = p.finished("r")
    assert report["loaded_tokens"] == 4 and report["load_failed_tokens"] == 8


def test_cost_model_refuses_loads_that_do_not_pay():
    cheap_recompute = CostModel(prefill_tokens_per_s=1e9)
    p = planner(stored=3, cost=cheap_recompute)
    assert p.match("r", TAGS, lambda: list(range(13)), 0) == 0
    assert p.counters["loads_skipped_by_cost"] == 1
    hold, report = p.finished("r")
    assert report["decision"] == "recompute_cheaper" and not hold  # no save: blocks freed at once


def test_cost_model_learns_from_measurements():
    c = CostModel(prefill_tokens_per_s=1000, load_bytes_per_s=1e9, load_latency_s=0.005, alpha=0.5)
    assert c.should_load(2048, 50_000_000)  # 55 ms vs 2 s
    for _ in range(20):
        c.observe_prefill(1000, 0.001)  # a very fast engine: 1M tokens/s
    assert c.prefill_tokens_per_s > 900_000
    assert not c.should_load(2048, 50_000_000)
    for _ in range(20):
        c.observe_load(100_000_000, 0.105)  # 1 GB/s net of the 5 ms latency
    assert c.load_bytes_per_s == pytest.approx(1e9, rel=0.01)
    c.observe_load(0, 1.0)
    c.observe_prefill(10, 0.0)  # nonsense samples are ignored
    assert c.load_bytes_per_s == pytest.approx(1e9, rel=0.01)


def test_saves_are_deduplicated_per_session():
    p = planner(stored=0)
    tokens = list(range(9))
    for rid in ("a", "b"):  # e.g. the n children of one ToT expansion: same prompt, same session
        p.match(rid, TAGS, lambda: tokens, 0)
        p.allocated(rid, 0)
    plan = p.step([("a", [1, 2, 3], 0, 9), ("b", [4, 5, 6], 0, 9)], [])
    assert [s.block_ids for s in plan.saves] == [[1, 2]]


def test_each_session_round_is_announced_once_and_decisions_are_named():
    p = planner(stored=0)
    assert p.new_round(TAGS) and not p.new_round(TAGS)
    assert p.new_round(KvTags("s1", 2)) and not p.new_round(KvTags("s1", 1))  # never backwards
    assert p.decision("unknown") == "miss"
    p.match("r", TAGS, lambda: list(range(13)), 0)
    assert p.decision("r") == "miss"


# --- chunks: the store's unit is chunk_blocks consecutive blocks ---------------------------------

CB = 2  # blocks per chunk: chunks of 8 tokens


def chunked(stored: int, calls: list | None = None, save: bool = True) -> Planner:
    """A planner over 2-block chunks whose store holds the first `stored` chunks of any prompt."""

    def lookup(session: str, hashes: list[str]) -> int:
        if calls is not None:
            calls.append(list(hashes))
        return min(stored, len(hashes))

    key = model_key("m", "bfloat16", BS, BS * CB)
    return Planner(key, BS, 1000, lookup, CostModel(prefill_tokens_per_s=1.0), chunk_blocks=CB, save=save)


def test_chunk_addresses_cover_chunk_tokens_and_depend_on_the_chunk_size():
    toks = list(range(20))
    assert len(block_hashes(model_key("m", "bfloat16", BS, 8), toks, 8)) == 2  # 16 of 20 tokens
    assert model_key("m", "bfloat16", BS, 8) != model_key("m", "bfloat16", BS, 16)


def test_a_prefix_ending_mid_chunk_loads_the_whole_chunks_before_it():
    calls = []
    p = chunked(stored=5, calls=calls)
    prompt = list(range(21))  # 20 whole tokens = 2 chunks + half a chunk; the 21st is computed
    assert p.match("r", TAGS, lambda: prompt, num_computed=0) == 16  # 2 chunks, not the half
    assert len(calls[0]) == 2
    p.allocated("r", 16)
    (load,) = p.step([("r", [9, 8, 7, 6, 5, 4], 16, 5)], []).loads
    assert load.hashes == block_hashes(p.model_key, prompt, 8) and load.skip == 0
    assert load.block_ids == [9, 8, 7, 6]


def test_a_local_hit_ending_mid_chunk_loads_that_chunk_but_writes_only_past_the_hit():
    p = chunked(stored=3)
    prompt = list(range(25))  # 3 whole chunks
    assert p.match("r", TAGS, lambda: prompt, num_computed=12) == 12  # blocks 3-5 (0-2 are local)
    p.allocated("r", 12)
    (load,) = p.step([("r", [10, 11, 12, 13, 14, 15, 16], 24, 1)], []).loads
    assert len(load.hashes) == 2 and load.skip == 1  # chunks 1 and 2; chunk 1's first block is local
    assert load.block_ids == [13, 14, 15]


def test_a_chunk_is_saved_once_all_its_blocks_are_full():
    p = chunked(stored=0)
    tokens = list(range(13))
    p.match("r", TAGS, lambda: tokens, 0)
    p.allocated("r", 0)
    plan = p.step([("r", [3, 4, 5, 6], 0, 13)], [])  # 3 full blocks: one whole chunk
    (save,) = plan.saves
    assert save.block_ids == [3, 4] and save.hashes == block_hashes(p.model_key, tokens, 8)[:1]
    tokens += [13, 14, 15]  # decoding fills block 3: chunk 1 is whole now
    (save,) = p.step([], [("r", None, False, 13, 3)]).saves
    assert save.block_ids == [5, 6]
    hold, report = p.finished("r")
    assert hold and report["saved_chunks"] == 2 and report["saved_blocks"] == 4


def test_a_failed_chunk_falls_back_to_its_first_block_and_is_saved_again():
    p = chunked(stored=3)
    tokens = list(range(25))
    p.match("r", TAGS, lambda: tokens, 0)
    p.allocated("r", 24)
    (load,) = p.step([("r", [1, 2, 3, 4, 5, 6, 7], 24, 1)], []).loads
    assert load.block_ids == [1, 2, 3, 4, 5, 6]
    p.load_failed({4, 5, 6})  # the worker reports every block from the bad chunk (1) on
    plan = p.step([], [("r", None, False, 8, 17)])  # vLLM recomputes from block 2 on
    assert [s.block_ids for s in plan.saves] == [[3, 4, 5, 6]]
    _, report = p.finished("r")
    assert report["loaded_tokens"] == 8 and report["load_failed_tokens"] == 16


def test_without_saves_nothing_is_held_and_preemptions_reach_the_worker():
    p = chunked(stored=0, save=False)
    p.match("r", TAGS, lambda: list(range(17)), 0)
    plan = p.step([("r", [1, 2, 3, 4, 5], 0, 17)], [], preempted=["q"])
    assert plan.saves == [] and plan.preempted == ["q"]
    assert p.finished("r")[0] is False
