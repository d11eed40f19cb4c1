"""Cluster-wide admission control and budgets (pure; time is passed in).

The depth-control actor admits every reasoning session here and grants Tree-of-Thought nodes. Under
pressure it degrades instead of refusing: a session that would exceed a budget gets a lower round
ceiling and is told why (`Admission.degraded`, `reasons`). Budgets:
- deep sessions in flight (admitted with a ceiling of at least `deep_rounds`),
- ToT children being generated at once, cluster-wide,
- completion tokens per minute per API key (a sliding window of per-second buckets).
Sessions hold a lease renewed by every call that names them, so a router that died cannot hold a
slot or nodes forever. API keys arrive already hashed (`services.control.client.api_key_id`): a raw key is
never passed in, stored or checkpointed here.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.reasoning.window import Window

SNAPSHOT_VERSION = 1
_COUNTERS = ("degraded_admissions", "untracked_admissions", "partial_grants", "denied_grants", "key_refusals")


class BudgetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_deep_sessions: int = Field(8, ge=1, le=100_000, description="Deep sessions in flight at once.")
    deep_rounds: int = Field(
        4, ge=2, le=64, description="A session is deep when its granted ceiling is this many rounds or more."
    )
    max_tot_nodes_in_flight: int = Field(
        6, ge=1, le=100_000, description="Tree-of-Thought children being generated at once, cluster-wide."
    )
    tokens_per_minute_per_key: int | None = Field(
        200_000,
        ge=1,
        description="Completion tokens per minute per API key before its sessions degrade; null = no limit.",
    )
    degraded_max_rounds: int = Field(
        2, ge=1, le=63, description="Round ceiling of a session admitted under pressure (shallow)."
    )
    session_ttl_s: float = Field(
        600.0, gt=0, le=86_400, description="A session lease not renewed this long expires and is released."
    )
    max_sessions: int = Field(
        10_000, ge=1, le=10_000_000, description="Sessions tracked at once; beyond it admission degrades."
    )

    @model_validator(mode="after")
    def _degraded_is_shallow(self) -> BudgetConfig:
        # Otherwise a session degraded for lack of a deep slot would take one anyway.
        if self.degraded_max_rounds >= self.deep_rounds:
            raise ValueError(
                f"degraded_max_rounds ({self.degraded_max_rounds}) must be below "
                f"deep_rounds ({self.deep_rounds})"
            )
        return self


@dataclass(frozen=True)
class Admission:
    max_rounds: int
    min_rounds: int
    degraded: bool
    reasons: tuple[str, ...] = ()


@dataclass
class _Session:
    api_key: str
    tier: str
    admission: Admission
    deep: bool
    nodes: int = 0
    seen: float = 0.0


@dataclass(frozen=True)
class KeyRefusal:
    """A key over its own limit, cluster-wide: what to tell the client (HTTP 429)."""

    kind: str  # "requests" or "tokens" (per minute)
    used: int
    limit: int
    retry_after_s: int

    def message(self) -> str:
        what = "requests" if self.kind == "requests" else "completion tokens"
        return (
            f"Rate limit reached for {what} per minute (all routers): limit {self.limit}, used "
            f"{self.used}. Try again in {self.retry_after_s} s."
        )


class Budgets:
    """Sessions are kept in lease order (least recently renewed first), so `expire` stops at the
    first live one; the deep-slot and node totals are kept as counters."""

    def __init__(self, cfg: BudgetConfig) -> None:
        self.cfg = cfg
        self.sessions: OrderedDict[str, _Session] = OrderedDict()
        self.windows: dict[str, Window] = {}  # completion tokens per key, last minute
        self.requests: dict[str, Window] = {}  # admitted requests per key with a limit, last minute
        self.key_refusals = 0
        self._deep = 0
        self._nodes = 0
        self.degraded_admissions = 0
        self.untracked_admissions = 0
        self.partial_grants = 0
        self.denied_grants = 0
        # Sessions denied nodes, oldest first: freed nodes go to them in order, so one busy search
        # cannot starve the others by re-taking its nodes the moment it releases them.
        self.waiting: list[str] = []

    @property
    def deep_in_flight(self) -> int:
        return self._deep

    @property
    def nodes_in_flight(self) -> int:
        return self._nodes

    def _touch(self, session_id: str, now: float) -> _Session | None:
        s = self.sessions.get(session_id)
        if s is not None:
            s.seen = now
            self.sessions.move_to_end(session_id)
        return s

    def _drop(self, session_id: str) -> None:
        if session_id in self.waiting:
            self.waiting.remove(session_id)
        s = self.sessions.pop(session_id, None)
        if s is not None:
            self._deep -= s.deep
            self._nodes -= s.nodes

    # --- admission ---------------------------------------------------------------------------

    def admit(
        self, session_id: str, *, api_key: str, tier: str, min_rounds: int, max_rounds: int, now: float
    ) -> Admission:
        """Admit a session; never refuses. Idempotent: a retried call gets the first answer.
        `api_key` is the caller's hashed key id, never the raw key."""
        if max_rounds < 1 or min_rounds < 0:
            raise ValueError(f"rounds must be max >= 1, min >= 0; got max {max_rounds}, min {min_rounds}")
        existing = self._touch(session_id, now)
        if existing is not None:
            return existing.admission
        reasons = self._pressure(api_key, max_rounds, now)
        if reasons:
            ceiling = min(max_rounds, self.cfg.degraded_max_rounds)
            admission = Admission(ceiling, min(min_rounds, ceiling), True, tuple(reasons))
            self.degraded_admissions += 1
        else:
            admission = Admission(max_rounds, min(min_rounds, max_rounds), False)
        if len(self.sessions) >= self.cfg.max_sessions:
            self.untracked_admissions += 1  # admitted, degraded, but holds nothing (no ToT nodes)
            return admission
        deep = admission.max_rounds >= self.cfg.deep_rounds
        self.sessions[session_id] = _Session(api_key, tier, admission, deep, seen=now)
        self._deep += deep
        return admission

    def limit_key(
        self, api_key: str, requests_per_minute: int | None, tokens_per_minute: int | None, now: float
    ) -> KeyRefusal | None:
        """A key's own limits, held for the whole cluster at admission: a refusal (nothing counted)
        when its completion tokens or its requests in the last minute reach them; else the request
        is counted. Tokens are those its finished sessions reported (`add_tokens`)."""
        if (
            tokens_per_minute is not None
            and (used := self.tokens_last_minute(api_key, now)) >= tokens_per_minute
        ):
            self.key_refusals += 1
            return KeyRefusal(
                "tokens", used, tokens_per_minute, self.windows[api_key].retry_after(now, tokens_per_minute)
            )
        if requests_per_minute is not None:
            w = self.requests.setdefault(api_key, Window())
            if (used := w.total(now)) >= requests_per_minute:
                self.key_refusals += 1
                return KeyRefusal(
                    "requests", used, requests_per_minute, w.retry_after(now, requests_per_minute)
                )
            w.add(1, now)
        return None

    def _pressure(self, api_key: str, max_rounds: int, now: float) -> list[str]:
        """Why a new session must be shallow; empty when it may have what it asked for. Each reason
        starts with its budget's name (`reason_budget`), then its figures."""
        cfg, reasons = self.cfg, []
        if max_rounds >= cfg.deep_rounds and self._deep >= cfg.max_deep_sessions:
            reasons.append(f"deep_sessions {self._deep}/{cfg.max_deep_sessions}")
        limit = cfg.tokens_per_minute_per_key
        if limit is not None and (used := self.tokens_last_minute(api_key, now)) >= limit:
            reasons.append(f"tokens_per_minute {used}/{limit} for key {api_key}")
        if len(self.sessions) >= cfg.max_sessions:
            reasons.append(f"sessions {len(self.sessions)}/{cfg.max_sessions}")
        return reasons

    # --- Tree-of-Thought nodes ---------------------------------------------------------------

    def grant_nodes(self, session_id: str, wanted: int, now: float) -> int:
        """0..wanted children this session may generate now; they count until released."""
        s = self._touch(session_id, now)
        if s is None or wanted <= 0:
            return 0
        first_in_line = not self.waiting or self.waiting[0] == session_id
        granted = max(0, min(wanted, self.cfg.max_tot_nodes_in_flight - self._nodes)) if first_in_line else 0
        if granted == 0:
            self.denied_grants += 1
            if session_id not in self.waiting:
                self.waiting.append(session_id)
        else:
            if session_id in self.waiting:
                self.waiting.remove(session_id)
            if granted < wanted:
                self.partial_grants += 1
        s.nodes += granted
        self._nodes += granted
        return granted

    def release_nodes(self, session_id: str, n: int, now: float) -> None:
        s = self._touch(session_id, now)
        if s is not None:
            n = min(max(0, n), s.nodes)  # never below zero, whatever a retried release says
            s.nodes -= n
            self._nodes -= n

    # --- tokens ------------------------------------------------------------------------------

    def add_tokens(self, api_key: str, tokens: int, now: float) -> None:
        """Count completion tokens against a (hashed) key id."""
        if tokens > 0:
            self.windows.setdefault(api_key, Window()).add(tokens, now)

    def tokens_last_minute(self, api_key: str, now: float) -> int:
        w = self.windows.get(api_key)
        if w is None:
            return 0
        total = w.total(now)
        if total == 0:
            del self.windows[api_key]  # bounded memory: idle keys leave
        return total

    # --- lifecycle ---------------------------------------------------------------------------

    def finish(self, session_id: str, now: float) -> None:
        """The session ended: its deep slot and nodes in flight are free."""
        self._drop(session_id)

    def expire(self, now: float) -> list[str]:
        """Drop sessions whose lease is older than the TTL (their router died), and idle key windows."""
        gone = []
        for sid, s in self.sessions.items():
            if now - s.seen <= self.cfg.session_ttl_s:
                break  # lease order: every later session was renewed more recently
            gone.append(sid)
        for sid in gone:
            self._drop(sid)
        for windows in (self.windows, self.requests):
            for key in [k for k, w in windows.items() if w.total(now) == 0]:
                del windows[key]
        return gone

    def snapshot(self) -> dict:
        """JSON-serialisable state, for the actor's checkpoint."""
        return {
            "version": SNAPSHOT_VERSION,
            "sessions": [
                {
                    "id": sid,
                    "api_key": s.api_key,
                    "tier": s.tier,
                    "max_rounds": s.admission.max_rounds,
                    "min_rounds": s.admission.min_rounds,
                    "degraded": s.admission.degraded,
                    "reasons": list(s.admission.reasons),
                    "deep": s.deep,
                    "nodes": s.nodes,
                    "seen": s.seen,
                }
                for sid, s in self.sessions.items()
            ],
            "windows": {k: [list(b) for b in w.buckets] for k, w in self.windows.items()},
            "requests": {k: [list(b) for b in w.buckets] for k, w in self.requests.items()},
            "counters": {name: getattr(self, name) for name in _COUNTERS},
            "waiting": list(self.waiting),
        }

    @classmethod
    def restore(cls, cfg: BudgetConfig, snap: dict, now: float) -> Budgets:
        """A restarted actor's budgets, minus sessions already past their TTL at `now`. A snapshot of
        another format version starts empty: forgotten leases only under-count for one TTL, whereas
        refusing would keep the actor from ever starting."""
        b = cls(cfg)
        if snap.get("version") != SNAPSHOT_VERSION:
            return b
        for s in snap["sessions"]:  # already in lease order
            adm = Admission(s["max_rounds"], s["min_rounds"], s["degraded"], tuple(s["reasons"]))
            b.sessions[s["id"]] = _Session(s["api_key"], s["tier"], adm, s["deep"], s["nodes"], s["seen"])
            b._deep += s["deep"]
            b._nodes += s["nodes"]
        for key, buckets in snap["windows"].items():
            b.windows[key] = Window(deque((int(t), int(n)) for t, n in buckets))
        for key, buckets in snap.get("requests", {}).items():
            b.requests[key] = Window(deque((int(t), int(n)) for t, n in buckets))
        for name in _COUNTERS:
            setattr(b, name, int(snap["counters"].get(name, 0)))
        b.waiting = [sid for sid in snap.get("waiting", []) if sid in b.sessions]
        b.expire(now)
        return b

    def stats(self, now: float) -> dict:
        return {
            "sessions": len(self.sessions),
            "max_sessions": self.cfg.max_sessions,
            "deep_sessions_in_flight": self._deep,
            "max_deep_sessions": self.cfg.max_deep_sessions,
            "tot_nodes_in_flight": self._nodes,
            "max_tot_nodes_in_flight": self.cfg.max_tot_nodes_in_flight,
            "tokens_per_minute_per_key": self.cfg.tokens_per_minute_per_key,
            "keys_metered": sum(1 for w in self.windows.values() if w.total(now) > 0),
            "key_refusals": self.key_refusals,
            "degraded_admissions": self.degraded_admissions,
            "untracked_admissions": self.untracked_admissions,
            "partial_node_grants": self.partial_grants,
            "denied_node_grants": self.denied_grants,
            "sessions_waiting_for_nodes": len(self.waiting),
        }


@dataclass
class NodeLease:
    """One session's Tree-of-Thought nodes as its router holds them (pure). Depth control grants
    nodes in batches of `lease` expansions' worth and counts them in flight until the session
    finishes; the search reuses them for its later expansions, so it asks the actor again only when
    it wants more than it holds. Children being generated never exceed what is held, so the
    cluster-wide cap holds exactly."""

    lease: int = 1  # expansions' worth of nodes asked at once
    held: int = 0  # granted by depth control (its in-flight count for this session)
    busy: int = 0  # being generated now

    @property
    def free(self) -> int:
        return self.held - self.busy

    def ask(self, wanted: int) -> int:
        """Nodes to ask of depth control before `take(wanted)`; 0 when enough are held."""
        return 0 if self.free >= wanted else wanted * self.lease - self.free

    def add(self, granted: int) -> None:
        self.held += max(0, granted)

    def take(self, wanted: int) -> int:
        n = max(0, min(wanted, self.free))
        self.busy += n
        return n

    def put(self, n: int) -> None:
        self.busy -= max(0, min(n, self.busy))


def reason_budget(reason: str) -> str:
    """The budget a degraded reason names ("tokens_per_minute 1200/1000 for key k" -> its first word):
    a bounded label, where the reason's figures and key id would make a metric series per value."""
    return reason.split(" ", 1)[0]
