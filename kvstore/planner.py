"""The scheduler side of Ponder's vLLM KV connector, as pure bookkeeping (no vLLM, no torch, no Ray).

The store's unit is a *chunk*: `chunk_blocks` consecutive vLLM cache blocks (256 tokens by default),
addressed by a hash chain over chunks (kvstore/chain.py). Per-object costs (header, RPC, slot,
lookup) are paid per chunk, not per 16-token block. For each tagged request the planner answers two
questions the scheduler asks, and plans each step:
- `match`: how many prompt tokens beyond the local prefix cache the store can supply: whole stored
  chunks (a prefix that ends mid-chunk loads the whole chunks before it), never the prompt's last
  token (vLLM must compute at least one), and only when the cost model predicts the load beats
  recomputing. A local hit that ends mid-chunk loads that chunk whole but writes only its blocks
  beyond the hit (`LoadSpec.skip`).
- `step`: which chunks to load into which cache blocks before this step's forward pass, and which of
  the request's chunks become complete in it (prompt or generated tokens) and are saved after it.
  Chunks below `saved_upto` are known to be in the store and are not saved again.
- `load_failed`: the worker could not load some blocks (missing, corrupt); vLLM recomputes from the
  first of them, so the request's loaded count and its `saved_upto` fall back to that chunk.
- `finished`: the request's report, and whether its blocks must outlive it: saves are asynchronous
  (the worker copies a step's chunks after the step), so a request that ever had a save planned is
  freed only when the worker reports its copies done (vLLM's request_finished -> True + get_finished).

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
    """Chunks to read, and where their blocks go: the chunks' blocks in order, minus `skip` leading
    blocks (already in vLLM's cache), cut to `len(block_ids)` blocks."""

    req_id: str
    session: str
    hashes: list[str]
    skip: int
    block_ids: list[int]


@dataclass
class SaveSpec:
    """Whole chunks to save: `block_ids` holds chunk_blocks cache blocks per hash, in order."""

    req_id: str
    tags: KvTags
    hashes: list[str]
    block_ids: list[int]


@dataclass
class StepPlan:
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    computed_tokens: int = 0  # tokens this step computes (for the prefill-rate measurement)
    preempted: list[str] = field(default_factory=list)  # requests whose blocks vLLM just freed


@dataclass
class _Req:
    tags: KvTags
    tokens: Callable[[], Sequence[int]]  # the request's token ids so far (prompt + output)
    chain: BlockChain  # over chunks
    block_ids: list[int] = field(default_factory=list)
    saved_upto: int = 0  # chunks [0, saved_upto) are in the store
    load: tuple[int, int] | None = None  # blocks [start, end) to load in the next step
    loading: dict[int, int] = field(default_factory=dict)  # cache block id -> chunk index, last load
    loaded_blocks: int = 0
    failed_blocks: int = 0
    saved_chunks: int = 0
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
        chunk_blocks: int = 1,
        save: bool = True,
    ) -> None:
        if chunk_blocks < 1:
            raise ValueError("chunk_blocks must be >= 1")
        self.model_key, self.bs, self.bytes_per_block = model_key, block_size, bytes_per_block
        self.cb, self.ct = chunk_blocks, chunk_blocks * block_size  # blocks and tokens per chunk
        self.lookup = lookup
        self.cost = cost or CostModel()
        self.save = save
        self.reqs: dict[str, _Req] = {}
        self._recent: OrderedDict[tuple[str, str], None] = OrderedDict()  # (session, hash) saved lately
        self._dedup_size = dedup_size
        self._rounds: OrderedDict[str, int] = OrderedDict()  # session -> last round announced
        self.counters = {"lookups": 0, "hit_chunks": 0, "loads_skipped_by_cost": 0}

    def match(
        self, req_id: str, tags: KvTags | None, tokens: Callable[[], Sequence[int]], num_computed: int
    ) -> int:
        """Tokens the store can add beyond the `num_computed` (block-aligned) local hit; 0 = none."""
        if tags is None:
            return 0
        st = self.reqs.get(req_id)
        if st is None:
            st = self.reqs[req_id] = _Req(tags, tokens, BlockChain(self.model_key, self.ct))
        prompt = tokens()
        max_chunks = (len(prompt) - 1) // self.ct  # the last prompt token is always computed
        start = num_computed // self.bs  # first block vLLM does not have
        st.load = None
        if max_chunks * self.cb <= start:
            st.decision = "local"  # vLLM's own prefix cache has every block the store could add
            return 0
        hashes = st.chain.extend(prompt, max_chunks)
        self.counters["lookups"] += 1
        hit = min(self.lookup(tags.session, hashes), max_chunks)
        self.counters["hit_chunks"] += hit
        st.saved_upto = max(st.saved_upto, hit)
        end = hit * self.cb
        if end <= start:
            st.decision = "miss"
            return 0
        n = (end - start) * self.bs
        moved = (hit - start // self.cb) * self.cb * self.bytes_per_block  # whole chunks travel
        if not self.cost.should_load(n, moved):
            self.counters["loads_skipped_by_cost"] += 1
            st.decision = "recompute_cheaper"
            return 0
        st.load, st.decision = (start, end), "load"
        return n

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
        preempted: Sequence[str] = (),
    ) -> StepPlan:
        """new: (req_id, block_ids, num_computed, num_scheduled); cached: (req_id, new_block_ids or
        None, resumed, num_computed, num_scheduled); preempted: requests vLLM preempted this step."""
        plan = StepPlan(preempted=list(preempted))
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
            self._plan_load(req_id, st, plan)
        tokens = st.tokens()
        full = min(min(done_tokens, len(tokens)) // self.ct, len(st.block_ids) // self.cb)
        if not self.save or full <= st.saved_upto:
            return
        hashes = st.chain.extend(tokens, full)
        keep = [i for i in range(st.saved_upto, full) if (st.tags.session, hashes[i]) not in self._recent]
        st.saved_upto = full
        if keep:
            ids = [b for i in keep for b in st.block_ids[i * self.cb : (i + 1) * self.cb]]
            plan.saves.append(SaveSpec(req_id, st.tags, [hashes[i] for i in keep], ids))
            st.saved_chunks += len(keep)
            for i in keep:
                self._remember(st.tags.session, hashes[i])

    def _plan_load(self, req_id: str, st: _Req, plan: StepPlan) -> None:
        assert st.load is not None
        start, end = st.load
        st.load = None
        first, last = start // self.cb, -(-end // self.cb)  # chunks [first, last)
        ids = st.block_ids[start:end]
        if len(ids) != end - start:
            return
        hashes = st.chain.extend(st.tokens(), last)[first:last]
        plan.loads.append(LoadSpec(req_id, st.tags.session, hashes, start - first * self.cb, ids))
        st.loading = {b: (start + i) // self.cb for i, b in enumerate(ids)}
        st.loaded_blocks += end - start

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
            first = min(bad)  # a chunk index: the worker reports every block from its first on
            lost = sum(1 for c in st.loading.values() if c >= first)
            st.loaded_blocks -= lost
            st.failed_blocks += lost
            st.saved_upto = min(st.saved_upto, first)
            hashes = st.chain.extend(st.tokens(), max(st.loading.values()) + 1)
            for c in range(first, len(hashes)):
                self._recent.pop((st.tags.session, hashes[c]), None)
            st.loading = {}

    def finished(self, req_id: str) -> tuple[bool, dict | None]:
        """(whether the request's blocks must wait for the worker's copies, its report or None if
        it was not tracked); forgets it."""
        st = self.reqs.pop(req_id, None)
        if st is None:
            return False, None
        return st.saved_chunks > 0, {
            "loaded_tokens": st.loaded_blocks * self.bs,
            "load_failed_tokens": st.failed_blocks * self.bs,
            "saved_blocks": st.saved_chunks * self.cb,
            "saved_chunks": st.saved_chunks,
            "decision": st.decision,
        }
