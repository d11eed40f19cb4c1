"""The KV store's pure core: exact eviction order, tier moves, two-phase commits, sharding."""

import pytest

from kvstore.core import KvCore, Retention, State, StoreFull, Tier
from kvstore.ring import HashRing, moves


def core(ram=4, disk=2, window=100.0):
    return KvCore({Tier.RAM: ram, Tier.DISK: disk}, slot_bytes=1024, retention_window_s=window)


def put(c, h, session="s", round_=0, branch="", now=0.0, ok=True):
    p = c.prepare_put(h, session=session, round_=round_, branch=branch, nbytes=512, now=now)
    if p is not None and p.demote is not None:
        c.complete_demote(p.demote.hash, True)
    c.complete_put(h, ok)
    return p


def test_eviction_order_follows_reasoning_structure_then_lru():
    c = core(ram=8)
    for i, (session, rnd, branch) in enumerate(
        [("a", 0, ""), ("a", 1, ""), ("a", 2, ""), ("a", 3, ""), ("b", 0, "x"), ("b", 0, "y"), ("c", 0, "")]
    ):
        put(c, f"h{i}", session, rnd, branch, now=float(i))
    c.mark_round("a", 3, now=10)  # a: rounds 2, 3 hot; 0, 1 old
    c.mark_round("b", 0, now=10)
    c.mark_exited("c", now=5)  # an early-exited trace goes first
    assert c.eviction_order(Tier.RAM, now=20) == ["h6", "h0", "h1", "h2", "h3", "h4", "h5"]
    assert c.retention(c.blocks["h4"], now=20) is Retention.HOT
    # a session untouched for longer than the window becomes idle: before old rounds of live ones
    c.mark_round("a", 3, now=105)
    assert c.eviction_order(Tier.RAM, now=112) == ["h6", "h4", "h5", "h0", "h1", "h2", "h3"]


def test_ram_full_demotes_to_disk_and_doomed_blocks_are_dropped():
    c = core(ram=2, disk=1)
    put(c, "a0", "a", 0, now=0)
    put(c, "a1", "a", 1, now=1)
    c.mark_round("a", 3, now=2)  # both old now
    p = c.prepare_put("a3", session="a", round_=3, branch="", nbytes=512, now=3)
    assert p.demote.hash == "a0" and p.demote.src == (Tier.RAM, p.slot) and p.demote.dst[0] is Tier.DISK
    assert c.blocks["a0"].state is State.MOVING and c.lookup_prefix(["a0"]) == 0  # not readable mid-move
    c.complete_demote("a0", True)
    c.complete_put("a3", True)
    assert (c.blocks["a0"].tier, c.blocks["a3"].tier) == (Tier.DISK, Tier.RAM)
    # RAM and disk full: the next demotion drops the disk's most expendable block
    p = c.prepare_put("a4", session="a", round_=4, branch="", nbytes=512, now=4)
    assert p.demote.hash == "a1" and p.dropped == ("a0",)
    c.complete_demote("a1", False)  # a failed copy drops the block, never a dangling entry
    c.complete_put("a4", True)
    assert set(c.blocks) == {"a3", "a4"}
    assert ("evict", "a1", "demote_failed") in c.events and ("evict", "a0", "disk_full") in c.events
    c.mark_exited("a", now=5)
    p = c.prepare_put("z", session="z", round_=0, branch="", nbytes=512, now=6)
    assert p.demote is None and p.dropped == ("a3",)  # doomed: dropped, not demoted


def test_two_phase_put_and_failed_reads():
    c = core()
    c.prepare_put("x", session="s", round_=0, branch="", nbytes=10, now=0)
    assert c.lookup_prefix(["x"]) == 0  # pending: not yet loadable
    c.complete_put("x", False)
    assert "x" not in c.blocks and c.stats()["slots_used"]["ram"] == 0
    for h in ("p0", "p1", "p2"):
        put(c, h)
    assert c.lookup_prefix(["p0", "p1", "missing", "p2"]) == 2
    got = c.prepare_get(["p0", "p1", "p2"], now=1)
    assert [g[0] for g in got] == ["p0", "p1", "p2"]
    assert c.eviction_order(Tier.RAM, now=1) == []  # pinned blocks never move
    c.complete_get(["p0", "p1"], ok=True)
    c.complete_get(["p2"], ok=False)  # e.g. a checksum mismatch: dropped, the prefix is recomputed
    assert c.lookup_prefix(["p0", "p1", "p2"]) == 2 and "p2" not in c.blocks


def test_everything_pinned_is_a_clear_error_and_oversize_is_refused():
    c = core(ram=1, disk=1)
    put(c, "only")
    c.prepare_get(["only"], now=1)
    with pytest.raises(StoreFull):
        c.prepare_put("next", session="s", round_=1, branch="", nbytes=1, now=2)
    with pytest.raises(ValueError, match="exceeds"):
        c.prepare_put("big", session="s", round_=1, branch="", nbytes=4096, now=2)


def test_bulk_finish_frees_every_slot_of_a_session():
    c = core(ram=2, disk=4)
    for r in range(4):
        c.mark_round("s", r, now=float(r))
        put(c, f"r{r}", "s", r, now=float(r))  # RAM holds 2: older rounds were demoted on the way
    assert c.stats()["slots_used"] == {"ram": 2, "disk": 2}
    freed = c.finish_session("s")
    assert sorted(h for h, _, _ in freed) == ["r0", "r1", "r2", "r3"]
    assert c.stats()["blocks"] == 0 and c.stats()["slots_used"] == {"ram": 0, "disk": 0}


def test_ring_moves_only_a_joining_shards_share():
    ring = HashRing(["n1", "n2", "n3"])
    sessions = [f"session-{i}" for i in range(3000)]
    owners = {ring.owner(s) for s in sessions}
    assert owners == {"n1", "n2", "n3"}
    bigger = ring.copy()
    bigger.add("n4")
    moved = moves(ring, bigger, sessions)
    assert all(new == "n4" for _, new in moved.values())  # nothing moves between old shards
    assert 0.15 < len(moved) / len(sessions) < 0.35  # about a quarter
    smaller = ring.copy()
    smaller.remove("n2")
    gone = moves(ring, smaller, sessions)
    assert all(old == "n2" for old, _ in gone.values())
    assert len(gone) == sum(1 for s in sessions if ring.owner(s) == "n2")
    assert HashRing(["n1", "n2", "n3"]).owner("session-7") == ring.owner("session-7")  # stable
    with pytest.raises(LookupError):
        HashRing().owner("x")
