"""The scheduler side of Ponder's vLLM KV connector, as pure bookkeeping (no vLLM, no torch, no Ray).

For each tagged request it answers two questions the scheduler asks, and plans each step:
- `match`: how many prompt tokens beyond the local prefix cache the store can supply. Only whole
  blocks, never the prompt's last token (vLLM must compute at least one), and only when the cost
  model predicts the load beats recomputing them.
- `step`: which store blocks to load into which cache blocks before this step's forward pass, and
  which of the request's cache blocks become complete in it (prompt or generated tokens) and are
  saved after it. Blocks below `saved_upto` are known to be in the store and are not saved again.
- `load_failed`: the worker could not load some blocks (missing, corrupt); vLLM recomputes from the
  first of them, so the request's loaded count and its `saved_upto` fall back to that block.

Requests carry tags `{"session", "round", "branch"}` (vLLM SamplingParams.extra_args["ponder_kv"]);
untagged requests are left to vLLM alone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvstore.chain import BlockChain
from kvstore.cost import CostModel

TAGS_KEY = "ponder_kv"
MAX_TAG = 256


@dataclass(frozen=True)
class KvTags:
    session: str
    round: int = 0
    branch: str = ""

    @classmethod
    def from_extra_args(cls, extra: object) -> KvTags | None:
        """The request's tags, or None when absent or malformed (such a request is simply not cached)."""
        raw = extra.get(TAGS_KEY) if isinstance(extra, dict) else None
        if not isinstance(raw, dict):
            return None
        session, round_, branch = raw.get("session"), raw.get("round", 0), raw.get("branch", "")
        if not isinstance(session, str) or not 0 < len(session) <= MAX_TAG:
            return None
        if not isinstance(round_, int) or isinstance(round_, bool) or round_ < 0:
            return None
        if not isinstance(branch, str) or len(branch) > MAX_TAG:
            return None
        return cls(session, round_, branch)

    def as_extra_args(self) -> dict:
        return {TAGS_KEY: {"session": self.session, "round": self.round, "branch": self.branch}}


@dataclass
class LoadSpec:
    req_id: str
    session: str
    hashes: list[str]
    block_ids: list[int]


@dataclass
class SaveSpec:
    req_id: str
    tags: KvTags
    hashes: list[str]
    block_ids: list[int]


@dataclass
class StepPlan:
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    computed_tokens: int = 0  # tokens this step computes (for the prefill-rate measurement)


@dataclass
class _Req:
    tags: KvTags
    tokens: Callable[[], Sequence[int]]  # the request's token ids so far (prompt + output)
    chain: BlockChain
    block_ids: list[int] = field(default_factory=list)
    saved_upto: int = 0  # blocks [0, saved_upto) are in the store
    load: tuple[int, int] | None = None  # blocks [start, end) to load in the next step
    loading: dict[int, int] = field(default_factory=dict)  # cache block id -> chain index, last load
    loaded_blocks: int = 0
    failed_blocks: int = 0
    saved_blocks: int = 0
    decision: str = ""


class Planner:
    def __init__(
        self,
        model_key: str,
        block_size: int,
        bytes_per_block: int,
        lookup: Callable[[str, list[str]], int],
        cost: CostModel | None = None,
        dedup_size: int = 65536,
    ) -> None:
        self.model_key, self.bs, self.bytes_per_block = model_key, block_size, bytes_per_block
        self.lookup = lookup
        self.cost = cost or CostModel()
        self.reqs: dict[str, _Req] = {}
        self._recent: OrderedDict[tuple[str, str], None] = OrderedDict()  # (session, hash) saved lately
        self._dedup_size = dedup_size
        self._rounds: OrderedDict[str, int] = OrderedDict()  # session -> last round announced
        self.counters = {"lookups": 0, "hit_blocks": 0, "loads_skipped_by_cost": 0}

    def match(
        self, req_id: str, tags: KvTags | None, tokens: Callable[[], Sequence[int]], num_computed: int
    ) -> int:
        """Tokens the store can add beyond the `num_computed` (block-aligned) local hit; 0 = none."""
        if tags is None:
            return 0
        st = self.reqs.get(req_id)
        if st is None:
            st = self.reqs[req_id] = _Req(tags, tokens, BlockChain(self.model_key, self.bs))
        prompt = tokens()
        max_blocks = (len(prompt) - 1) // self.bs  # the last prompt token is always computed
        start = num_computed // self.bs
        st.load = None
        if max_blocks <= start:
            st.decision = "local"  # vLLM's own prefix cache has every block the store could add
            return 0
        hashes = st.chain.extend(prompt, max_blocks)
        self.counters["lookups"] += 1
        hit = min(self.lookup(tags.session, hashes), max_blocks)
        self.counters["hit_blocks"] += hit
        st.saved_upto = max(st.saved_upto, hit)
        if hit <= start:
            st.decision = "miss"
            return 0
        n = hit - start
        if not self.cost.should_load(n * self.bs, n * self.bytes_per_block):
            self.counters["loads_skipped_by_cost"] += 1
            st.decision = "recompute_cheaper"
            return 0
        st.load, st.decision = (start, hit), "load"
        return n * self.bs

    def new_round(self, tags: KvTags) -> bool:
        """True the first time a session's round is seen (announce it to the shard: retention)."""
        if self._rounds.get(tags.session, -1) >= tags.round:
            return False
        self._rounds[tags.session] = tags.round
        self._rounds.move_to_end(tags.session)
        if len(self._rounds) > self._dedup_size:
            self._rounds.popitem(last=False)
        return True

    def decision(self, req_id: str) -> str:
        """The last lookup's outcome for a request: load, miss, local, recompute_cheaper."""
        st = self.reqs.get(req_id)
        return st.decision if st is not None and st.decision else "miss"

    def allocated(self, req_id: str, num_external: int) -> None:
        """The scheduler allocated blocks and settled on `num_external` tokens (may be fewer)."""
        st = self.reqs.get(req_id)
        if st is None or st.load is None:
            return
        start, _ = st.load
        n = num_external // self.bs
        st.load = (start, start + n) if n else None

    def step(
        self,
        new: Sequence[tuple[str, Sequence[int], int, int]],
        cached: Sequence[tuple[str, Sequence[int] | None, bool, int, int]],
    ) -> StepPlan:
        """new: (req_id, block_ids, num_computed, num_scheduled); cached: (req_id, new_block_ids or
        None, resumed, num_computed, num_scheduled)."""
        plan = StepPlan()
        for req_id, block_ids, computed, scheduled in new:
            plan.computed_tokens += scheduled
            st = self.reqs.get(req_id)
            if st is not None:
                st.block_ids = list(block_ids)
                self._plan_one(req_id, st, computed + scheduled, plan)
        for req_id, new_ids, resumed, computed, scheduled in cached:
            plan.computed_tokens += scheduled
            st = self.reqs.get(req_id)
            if st is None:
                continue
            if resumed:
                st.block_ids = list(new_ids or [])
            elif new_ids:
                st.block_ids.extend(new_ids)
            self._plan_one(req_id, st, computed + scheduled, plan)
        return plan

    def _plan_one(self, req_id: str, st: _Req, done_tokens: int, plan: StepPlan) -> None:
        st.loading = {}  # failures of the previous step's load were reported before this step
        if st.load is not None:
            start, end = st.load
            st.load = None
            hashes = st.chain.extend(st.tokens(), end)[start:end]
            ids = st.block_ids[start:end]
            if len(ids) == end - start:
                plan.loads.append(LoadSpec(req_id, st.tags.session, hashes, ids))
                st.loading = {b: start + i for i, b in enumerate(ids)}
                st.loaded_blocks += end - start
        tokens = st.tokens()
        full = min(done_tokens, len(tokens)) // self.bs
        full = min(full, len(st.block_ids))
        if full <= st.saved_upto:
            return
        hashes = st.chain.extend(tokens, full)
        keep = [i for i in range(st.saved_upto, full) if (st.tags.session, hashes[i]) not in self._recent]
        st.saved_upto = full
        if keep:
            plan.saves.append(
                SaveSpec(req_id, st.tags, [hashes[i] for i in keep], [st.block_ids[i] for i in keep])
            )
            st.saved_blocks += len(keep)
            for i in keep:
                self._remember(st.tags.session, hashes[i])

    def _remember(self, session: str, h: str) -> None:
        self._recent[(session, h)] = None
        if len(self._recent) > self._dedup_size:
            self._recent.popitem(last=False)

    def load_failed(self, block_ids: set[int]) -> None:
        """vLLM recomputes from the first failed block of each request; count and save accordingly."""
        for st in self.reqs.values():
            bad = [st.loading[b] for b in block_ids if b in st.loading]
            if not bad:
                continue
            first = min(bad)
            lost = max(st.loading.values()) + 1 - first
            st.loaded_blocks -= lost
            st.failed_blocks += lost
            st.saved_upto = min(st.saved_upto, first)
            for i in range(first, first + lost):
                self._recent.pop((st.tags.session, st.chain.extend(st.tokens(), i + 1)[i]), None)
            st.loading = {}

    def finished(self, req_id: str) -> dict | None:
        """The request's report (None if it was not tracked); forgets it."""
        st = self.reqs.pop(req_id, None)
        if st is None:
            return None
        return {
            "loaded_tokens": st.loaded_blocks * self.bs,
            "load_failed_tokens": st.failed_blocks * self.bs,
            "saved_blocks": st.saved_blocks,
            "decision": st.decision,
        }
