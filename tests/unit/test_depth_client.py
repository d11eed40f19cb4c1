"""Central policy, local verdicts: the router's DepthClient against the real DepthControl class
(without Ray: `Remote` runs its methods in place, as one actor serialises its calls), several routers
sharing one actor. Pure logic; tests/e2e/test_reasoning_control.py runs the same over Ray and HTTP."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from services.config import DEFAULT_CONFIG, AppConfig
from services.control.client import Control, DepthClient
from services.control.depth_control import DepthControl
from services.control.state import StateStore
from services.reasoning.budgets import NodeLease
from services.reasoning.loop import RoundLoop, RoundRecord
from services.reasoning.planning import Admission, PlanRequest, RequestPlanner
from services.reasoning.signals import Signals
from services.reasoning.tiers import Action, make_plan


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Remote:
    """`actor.method.remote(...)` on a plain object: run now, the result in a done future."""

    def __init__(self, obj, down: bool = False) -> None:
        self.obj, self.down = obj, down

    def __getattr__(self, name):
        fn = getattr(self.obj, name)
        remote = self

        class Method:
            @staticmethod
            def remote(*args, **kwargs):
                fut = asyncio.get_running_loop().create_future()
                if remote.down:
                    fut.set_exception(ConnectionError("actor unreachable"))
                    fut.exception()  # retrieved: a fire-and-forget call's error is not logged
                else:
                    fut.set_result(fn(*args, **kwargs))
                return fut

        return Method


@pytest.fixture
def cfg(tmp_path):
    c = AppConfig.load(DEFAULT_CONFIG).depth_control
    c.state_dir = str(tmp_path)
    c.budgets.max_deep_sessions = 2
    c.budgets.max_tot_nodes_in_flight = 5
    return c


def signals(confidence: float) -> Signals:
    return Signals(confidence, None, None, None, 10, stable_rounds=1)


async def run_chain(client: DepthClient, actor: DepthControl, rid: str, plan, confidences):
    """What the router does for one chain request: admit, a verdict per round, finish with the
    report. Returns the loop and the Control."""
    control = Control()
    adm = await client.admit(rid, "k", plan, control)
    if adm is not None:
        plan = RequestPlanner.admitted(plan, _req(), Admission.from_dict(adm))
    decide, loop = client.decider(control), RoundLoop(plan)
    for c in confidences:
        record = RoundRecord(len(loop.rounds), "x", 1, 1, 0, c, 1.0, 1.0, signals=signals(c))
        verdict = loop.settle(record, await decide(plan, len(loop.rounds) + 1, record.signals))
        if verdict.action is Action.EXIT:
            break
    reports = [{"decision": r.decision, "decided_by": r.decided_by} for r in loop.rounds]
    client.finish(rid, "k", len(loop.rounds), reports)
    return loop, control


def _req() -> PlanRequest:
    return PlanRequest("q")  # names no threshold: the domain's, as admission grants it, applies


def test_a_chain_costs_the_actor_two_calls_whatever_its_rounds(cfg):
    actor = DepthControl(cfg.model_dump(), "c", Clock())
    seen: list[str] = []
    client = DepthClient(Remote(actor), 1.0, on_decision=lambda s, by: seen.append(by))
    plan = make_plan(actor.table, "high", min_rounds=1, confidence_threshold=1.0, strategy="cot")
    loop, control = asyncio.run(run_chain(client, actor, "r1", plan, [0.5] * 10))
    assert len(loop.rounds) == plan.max_rounds and loop.exit_reason.value == "ceiling"
    assert [r.decided_by for r in loop.rounds] == ["router"] * plan.max_rounds
    assert seen == ["router"] * plan.max_rounds
    assert actor.stats()["calls"] == {"admit": 1, "finish": 1}
    assert actor.stats()["decisions"] == {"below_threshold": plan.max_rounds - 1, "ceiling": 1}
    assert control.summary()["depth_control"] == "ok"


def test_actor_verdicts_ask_the_actor_only_for_rounds_the_guards_do_not_settle(cfg):
    cfg.verdicts = "actor"
    actor = DepthControl(cfg.model_dump(), "c", Clock())
    client = DepthClient(Remote(actor), 1.0)
    plan = make_plan(actor.table, "medium", confidence_threshold=0.9)  # min 3, max 4: one open round
    loop, _ = asyncio.run(run_chain(client, actor, "r1", plan, [0.5] * 4))
    assert [r.decided_by for r in loop.rounds] == ["router", "router", "depth_control", "router"]
    assert actor.stats()["calls"] == {"admit": 1, "decide": 1, "finish": 1}


def test_unreachable_depth_control_decides_locally_with_the_last_granted_threshold(cfg):
    actor = DepthControl(cfg.model_dump(), "c", Clock())
    remote = Remote(actor)
    client = DepthClient(remote, 1.0)
    plan = make_plan(actor.table, "low", domain="general")
    granted = asyncio.run(client.admit("r0", "k", plan, Control()))["domain_threshold"]
    assert client.last_threshold("general") == granted
    remote.down = True
    loop, control = asyncio.run(run_chain(client, actor, "r1", plan, [0.0] * 5))
    assert [r.decided_by for r in loop.rounds] == ["local"] * plan.max_rounds  # the hard ceiling
    assert control.summary()["local_ceilings"] is True
    assert client.last_threshold("general") == granted  # kept for the router's own admissions


def test_a_search_reuses_its_lease_and_asks_again_only_for_more(cfg):
    actor = DepthControl(cfg.model_dump(), "c", Clock())
    client = DepthClient(Remote(actor), 1.0, grant_wait_s=0.05)

    async def search():
        await client.admit("t", "k", make_plan(actor.table, "low"), Control())
        grant, release = client.nodes("t", Control())
        got = []
        for wanted in (3, 3, 2, 3, 4):  # expansions of a search, one after another
            n = await grant(wanted)
            got.append(n)
            await release(n)
        return got

    assert asyncio.run(search()) == [3, 3, 2, 3, 4]
    assert actor.stats()["calls"] == {"admit": 1, "grant_nodes": 2}  # 3 held, then one more
    assert actor.budgets.nodes_in_flight == 4  # held by the lease until the session finishes
    actor.finish("t", "k", 0)
    assert actor.budgets.nodes_in_flight == 0


def test_a_session_denied_nodes_waits_a_bounded_time_then_gets_what_frees(cfg):
    actor = DepthControl(cfg.model_dump(), "c", Clock())
    client = DepthClient(Remote(actor), 1.0, grant_wait_s=0.2)

    async def two_searches():
        for rid in ("a", "b"):
            await client.admit(rid, "k", make_plan(actor.table, "low"), Control())
        grant_a, _ = client.nodes("a", Control())
        grant_b, _ = client.nodes("b", Control())
        assert await grant_a(5) == 5  # the whole cluster's budget
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await grant_b(2) == 0  # nothing frees: b gives up within its bound
        waited = loop.time() - t0
        assert 0.1 <= waited <= 1.0
        later = asyncio.ensure_future(grant_b(2))
        await asyncio.sleep(0.03)
        client.finish("a", "k", 0)  # a's search ends: its lease is freed, b is first in line
        assert await later == 2

    asyncio.run(two_searches())


def test_node_lease_asks_in_batches_and_never_hands_out_more_than_it_holds():
    lease = NodeLease(lease=2)
    assert lease.ask(3) == 6
    lease.add(4)  # partial grant
    assert lease.take(3) == 3 and lease.free == 1 and lease.ask(3) == 5
    lease.put(3)
    assert lease.ask(3) == 0 and lease.take(9) == 4 and lease.busy <= lease.held
    lease.put(99)
    assert lease.busy == 0


# --- property: the guarantees hold under any interleaving of routers -----------------------------

# Repeats weight the draw: enough sessions and grants to press on the caps.
WEIGHTED = ["start"] * 3 + ["round"] * 3 + ["grant"] * 3 + ["release", "finish"] + ["threshold", "tick"] * 2
OPS = st.lists(
    st.tuples(
        st.sampled_from(WEIGHTED),
        st.integers(0, 2),  # router
        st.integers(0, 5),  # session slot
        st.floats(0.0, 1.0),  # confidence, or a threshold
        st.integers(1, 4),  # nodes wanted / released
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(ops=OPS)
# A threshold set after one router's admission, seen by another router's admission after the bound.
@example(
    ops=[
        ("start", 0, 0, 0.5, 1),
        ("threshold", 0, 0, 0.9, 1),
        ("tick", 0, 0, 0.75, 1),
        ("start", 1, 1, 0.0, 1),
    ]
)
def test_guarantees_hold_under_random_interleavings(tmp_path_factory, ops):
    cfg = AppConfig.load(DEFAULT_CONFIG).depth_control
    cfg.state_dir = str(tmp_path_factory.mktemp("state"))
    cfg.budgets.max_deep_sessions, cfg.budgets.max_tot_nodes_in_flight = 2, 5
    clock = Clock()
    actor = DepthControl(cfg.model_dump(), "c", clock)
    records = StateStore(actor.store.path)  # where the records actor writes thresholds
    routers = [DepthClient(Remote(actor), 1.0, grant_wait_s=0.0) for _ in range(3)]
    asyncio.run(_interleave(actor, routers, records, clock, ops))


class World:
    """Three routers, one actor, sessions in slots; each op is a method; invariants after every op."""

    def __init__(self, actor, routers, records, clock) -> None:
        self.actor, self.routers, self.records, self.clock = actor, routers, records, clock
        self.sessions: dict[int, dict] = {}
        self.threshold_set: tuple[float, float] | None = None  # (value, when)

    async def start(self, n, client, slot, x, k):
        tier = ["low", "medium", "high", "critical"][(slot + n) % 4]
        plan = make_plan(self.actor.table, tier, strategy="cot", domain="general")
        control = Control()
        adm = await client.admit(f"s{n}", "k", plan, control)
        plan = RequestPlanner.admitted(plan, _req(), Admission.from_dict(adm))
        t = self.threshold_set
        if t is not None and self.clock.t >= t[1] + self.actor.cfg.threshold_refresh_s:
            assert plan.confidence_threshold == t[0]  # every router, within the bound
        grant, release = client.nodes(f"s{n}", control)
        self.sessions[slot] = {"rid": f"s{n}", "client": client, "loop": RoundLoop(plan), "busy": []}
        self.sessions[slot] |= {"decide": client.decider(control), "grant": grant, "release": release}

    async def round(self, s, x, k):
        loop = s["loop"]
        if loop.done:
            return
        rec = RoundRecord(len(loop.rounds), "x", 1, 1, 0, x, 1.0, 1.0, signals=signals(x))
        loop.settle(rec, await s["decide"](loop.plan, len(loop.rounds) + 1, rec.signals))
        assert len(loop.rounds) <= loop.plan.max_rounds
        if loop.exit_reason is not None and loop.exit_reason.value == "confidence":
            assert len(loop.rounds) >= loop.plan.min_rounds

    async def grant(self, s, x, k):
        s["busy"].append(await s["grant"](k))

    async def release(self, s, x, k):
        if s["busy"]:
            await s["release"](s["busy"].pop())

    async def finish(self, s, x, k):
        s["client"].finish(s["rid"], "k", 1, [])
        self.sessions = {slot: v for slot, v in self.sessions.items() if v is not s}

    def threshold(self, x):
        value = round(0.5 + x / 2, 3)
        self.records.set_threshold("general", value, source="operator", now=self.clock.t)
        self.threshold_set = (value, self.clock.t)

    def check(self):
        generating = sum(sum(s["busy"]) for s in self.sessions.values())
        b, caps = self.actor.budgets, self.actor.cfg.budgets
        assert generating <= b.nodes_in_flight <= caps.max_tot_nodes_in_flight
        assert b.deep_in_flight <= caps.max_deep_sessions


async def _interleave(actor, routers, records, clock, ops):
    world = World(actor, routers, records, clock)
    for n, (op, r, slot, x, k) in enumerate(ops):
        s = world.sessions.get(slot)
        if op == "start" and s is None:
            await world.start(n, routers[r], slot, x, k)
        elif op in ("round", "grant", "release", "finish") and s is not None:
            await getattr(world, op)(s, x, k)
        elif op == "threshold":
            world.threshold(x)
        elif op == "tick":
            clock.t += x * 2
        world.check()
