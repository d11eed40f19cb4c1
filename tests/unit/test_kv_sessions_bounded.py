"""A long-running shard stays bounded: session entries leave with their blocks, the RAM pool is
resident from the start (found by the sustained-load run, `ponder bench soak`)."""

import subprocess
import sys
from pathlib import Path

from kvstore.core import KvCore, Tier
from kvstore.shard.shard import BlockMeta, Shard, ShardConfig

REPO = Path(__file__).resolve().parents[2]


def core(ram=4, window=100.0):
    return KvCore({Tier.RAM: ram}, slot_bytes=1024, retention_window_s=window)


def put(c, h, session, round_=0, now=0.0):
    c.prepare_put(h, session=session, round_=round_, branch="", nbytes=512, now=now)
    c.complete_put(h, True)


def test_an_exited_session_is_forgotten_with_its_last_block():
    c = core(ram=2)
    put(c, "a0", "a")
    put(c, "a1", "a", round_=1)
    c.mark_exited("a", now=1)
    assert set(c.sessions) == {"a"}  # its blocks stay as a cache while there is room
    put(c, "b0", "b", now=2)  # room for b: a's first block goes
    assert set(c.sessions) == {"a", "b"} and c.sessions["a"].blocks == 1
    put(c, "b1", "b", round_=1, now=3)  # a's last block goes, and a with it
    assert set(c.sessions) == {"b"} and set(c.blocks) == {"b0", "b1"}


def test_a_session_that_exits_holding_nothing_is_forgotten_at_once():
    c = core()
    c.mark_round("s", 0, now=0)  # a round announced, nothing saved (e.g. shorter than a block)
    c.mark_exited("s", now=1)
    assert c.sessions == {}


def test_idle_sessions_without_blocks_are_forgotten_after_the_window():
    c = core(window=100.0)
    put(c, "k0", "keep")  # holds a block: stays however idle
    c.mark_round("late", 3, now=10)  # e.g. a hint that arrived after the session ended
    assert c.forget_idle(now=50) == 0
    assert c.forget_idle(now=111) == 1 and set(c.sessions) == {"keep"}


def test_many_finished_requests_leave_a_bounded_index_and_no_live_session():
    c = core(ram=8)
    for i in range(1000):
        for r in range(3):
            put(c, f"s{i}-{r}", f"s{i}", round_=r, now=float(i))
        c.mark_exited(f"s{i}", now=float(i))
    st = c.stats()
    assert st["blocks"] == 8 and st["sessions"] <= 8  # before: one entry per request, forever
    assert st["live_sessions"] == 0 and st["live_blocks"] == 0 and st["pending"] == 0
    assert sum(s.blocks for s in c.sessions.values()) == st["blocks"]


def test_stats_count_live_sessions_and_their_blocks():
    c = core(ram=8)
    put(c, "x0", "x")
    put(c, "y0", "y")
    c.prepare_put("y1", session="y", round_=1, branch="", nbytes=10, now=1)  # not yet committed
    c.mark_exited("x", now=2)
    st = c.stats()
    assert (st["live_sessions"], st["live_blocks"], st["pending"], st["sessions"]) == (1, 2, 1, 2)


def test_bulk_finish_still_forgets_the_session():
    c = core()
    put(c, "f0", "f")
    assert [h for h, _, _ in c.finish_session("f")] == ["f0"] and c.sessions == {}


def test_a_late_put_after_exit_keeps_the_count_consistent():
    c = core(ram=1)
    put(c, "a0", "a")
    c.mark_exited("a", now=1)
    put(c, "a1", "a", round_=1, now=2)  # its own last block makes room, forgetting `a` meanwhile
    assert set(c.blocks) == {"a1"} and c.sessions["a"].blocks == 1 and c.sessions["a"].exited


def test_shard_sweep_forgets_idle_sessions():
    now = [0.0]
    sh = Shard(ShardConfig(ram_slots=2, slot_bytes=4096, retention_window_s=10.0), clock=lambda: now[0])
    sh.put([BlockMeta("h", "kept", 0)], [b"x" * 100])
    sh.mark_round("gone", 1)
    now[0] = 20.0
    sh.sweep()
    assert set(sh.core.sessions) == {"kept"}


def test_the_ram_pool_is_resident_from_the_start():
    """Measured in a fresh process: in this one, freed memory from earlier tests may be reused."""
    probe = (
        "import psutil; from kvstore.shard.pool import RamPool, slot_bytes_for\n"
        "p = psutil.Process(); before = p.memory_info().rss\n"
        "pool = RamPool(64, slot_bytes_for(1 << 20))\n"
        "print(p.memory_info().rss - before, pool.buffer.nbytes)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    grown, size = map(int, out.stdout.split())
    assert grown >= 0.9 * size, f"only {grown >> 20} MiB of {size >> 20} resident"
