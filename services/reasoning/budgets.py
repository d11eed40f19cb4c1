"""Cluster-wide admission control and budgets (pure; time is passed in).

The depth-control actor admits every reasoning session here and grants Tree-of-Thought nodes. Under
pressure it degrades instead of refusing: a session that would exceed a budget gets a lower round
ceiling and is told so (`degraded`). Budgets:
- deep sessions in flight (plans whose ceiling is at least `deep_rounds`),
- ToT children being generated at once, cluster-wide,
- completion tokens per minute per API key (a sliding window of per-second buckets).
Sessions hold a lease renewed by every call that names them, so a router that died cannot hold a
slot forever. API keys arrive already hashed (services.control.api_key_id): raw keys never get here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field

from pydantic import BaseModel, ConfigDict, Field

WINDOW_S = 60


class BudgetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_deep_sessions: int = Field(8, ge=1, le=100_000, description="Deep sessions in flight at once.")
    deep_rounds: int = Field(
        4, ge=1, le=16, description="A session is deep when its ceiling is this or more."
    )
    max_tot_nodes_in_flight: int = Field(
        6, ge=1, le=100_000, description="Tree-of-Thought children generated at once, cluster-wide."
    )
    tokens_per_minute_per_key: int | None = Field(
        200_000,
        ge=1,
        description="Completion tokens per minute per API key before degrading; null = no limit.",
    )
    degraded_max_rounds: int = Field(
        2, ge=1, le=16, description="Ceiling of a session admitted under pressure."
    )
    session_ttl_s: float = Field(600.0, gt=0, le=86_400, description="A lease not renewed this long expires.")
    max_sessions: int = Field(10_000, ge=1, le=10_000_000, description="Sessions tracked at once.")


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


@dataclass
class _Window:
    """Tokens per second over the last minute: at most WINDOW_S buckets per key."""

    buckets: deque[tuple[int, int]] = field(default_factory=deque)

    def add(self, tokens: int, now: float) -> None:
        sec = int(now)
        if self.buckets and self.buckets[-1][0] == sec:
            self.buckets[-1] = (sec, self.buckets[-1][1] + tokens)
        else:
            self.buckets.append((sec, tokens))
        self.trim(now)

    def trim(self, now: float) -> None:
        while self.buckets and self.buckets[0][0] <= int(now) - WINDOW_S:
            self.buckets.popleft()

    def total(self, now: float) -> int:
        self.trim(now)
        return sum(t for _, t in self.buckets)


class Budgets:
    def __init__(self, cfg: BudgetConfig) -> None:
        self.cfg = cfg
        self.sessions: dict[str, _Session] = {}
        self.windows: dict[str, _Window] = {}
        self.degraded_admissions = 0
        self.partial_grants = 0
        # Sessions denied nodes, oldest first: freed nodes go to them in order, so one busy search
        # cannot starve the others by re-taking its nodes the moment it releases them.
        self.waiting: list[str] = []

    # --- admission ---------------------------------------------------------------------------

    @property
    def deep_in_flight(self) -> int:
        return sum(1 for s in self.sessions.values() if s.deep)

    @property
    def nodes_in_flight(self) -> int:
        return sum(s.nodes for s in self.sessions.values())

    def admit(
        self, session_id: str, *, api_key: str, tier: str, min_rounds: int, max_rounds: int, now: float
    ) -> Admission:
        """Admit a session; idempotent (a retried call gets the first answer). Never refuses."""
        existing = self.sessions.get(session_id)
        if existing is not None:
            existing.seen = now
            return existing.admission
        reasons: list[str] = []
        deep = max_rounds >= self.cfg.deep_rounds
        if deep and self.deep_in_flight >= self.cfg.max_deep_sessions:
            reasons.append(f"deep_sessions {self.deep_in_flight}/{self.cfg.max_deep_sessions}")
        limit = self.cfg.tokens_per_minute_per_key
        used = self.tokens_last_minute(api_key, now)
        if limit is not None and used >= limit:
            reasons.append(f"tokens_per_minute {used}/{limit} for key {api_key}")
        if len(self.sessions) >= self.cfg.max_sessions:
            reasons.append(f"sessions {len(self.sessions)}/{self.cfg.max_sessions}")
        if reasons:
            ceiling = min(max_rounds, self.cfg.degraded_max_rounds)
            admission = Admission(ceiling, min(min_rounds, ceiling), True, tuple(reasons))
            self.degraded_admissions += 1
            deep = ceiling >= self.cfg.deep_rounds
        else:
            admission = Admission(max_rounds, min(min_rounds, max_rounds), False)
        if len(self.sessions) < self.cfg.max_sessions:  # beyond the cap: admitted, not tracked
            self.sessions[session_id] = _Session(api_key, tier, admission, deep, seen=now)
        return admission

    # --- Tree-of-Thought nodes ---------------------------------------------------------------

    def grant_nodes(self, session_id: str, wanted: int, now: float) -> int:
        s = self.sessions.get(session_id)
        if s is None or wanted <= 0:
            return 0
        s.seen = now
        free = self.cfg.max_tot_nodes_in_flight - self.nodes_in_flight
        first_in_line = not self.waiting or self.waiting[0] == session_id
        granted = max(0, min(wanted, free)) if first_in_line else 0
        if granted < wanted:
            self.partial_grants += 1
        if granted == 0:
            if session_id not in self.waiting:
                self.waiting.append(session_id)
        elif session_id in self.waiting:
            self.waiting.remove(session_id)
        s.nodes += granted
        return granted

    def release_nodes(self, session_id: str, n: int, now: float) -> None:
        s = self.sessions.get(session_id)
        if s is not None:
            s.seen = now
            s.nodes = max(0, s.nodes - n)

    # --- tokens ------------------------------------------------------------------------------

    def add_tokens(self, api_key: str, tokens: int, now: float) -> None:
        if tokens > 0:
            self.windows.setdefault(api_key, _Window()).add(tokens, now)

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
        self.sessions.pop(session_id, None)
        if session_id in self.waiting:
            self.waiting.remove(session_id)

    def expire(self, now: float) -> list[str]:
        gone = [sid for sid, s in self.sessions.items() if now - s.seen > self.cfg.session_ttl_s]
        for sid in gone:
            self.finish(sid, now)
        return gone

    def snapshot(self) -> dict:
        return {
            "sessions": {
                sid: {
                    "api_key": s.api_key,
                    "tier": s.tier,
                    "admission": {**asdict(s.admission), "reasons": list(s.admission.reasons)},
                    "deep": s.deep,
                    "nodes": s.nodes,
                    "seen": s.seen,
                }
                for sid, s in self.sessions.items()
            },
            "windows": {k: [list(b) for b in w.buckets] for k, w in self.windows.items()},
            "degraded_admissions": self.degraded_admissions,
            "partial_grants": self.partial_grants,
            "waiting": list(self.waiting),
        }

    @classmethod
    def restore(cls, cfg: BudgetConfig, snap: dict, now: float) -> Budgets:
        b = cls(cfg)
        for sid, s in snap.get("sessions", {}).items():
            a = s["admission"]
            adm = Admission(a["max_rounds"], a["min_rounds"], a["degraded"], tuple(a["reasons"]))
            b.sessions[sid] = _Session(s["api_key"], s["tier"], adm, s["deep"], s["nodes"], s["seen"])
        for key, buckets in snap.get("windows", {}).items():
            b.windows[key] = _Window(deque((int(t), int(n)) for t, n in buckets))
        b.degraded_admissions = int(snap.get("degraded_admissions", 0))
        b.partial_grants = int(snap.get("partial_grants", 0))
        b.waiting = [sid for sid in snap.get("waiting", []) if sid in b.sessions]
        b.expire(now)
        return b

    def stats(self, now: float) -> dict:
        return {
            "sessions": len(self.sessions),
            "deep_sessions_in_flight": self.deep_in_flight,
            "max_deep_sessions": self.cfg.max_deep_sessions,
            "tot_nodes_in_flight": self.nodes_in_flight,
            "max_tot_nodes_in_flight": self.cfg.max_tot_nodes_in_flight,
            "degraded_admissions": self.degraded_admissions,
            "partial_node_grants": self.partial_grants,
            "sessions_waiting_for_nodes": len(self.waiting),
            "keys_metered": len(self.windows),
        }
