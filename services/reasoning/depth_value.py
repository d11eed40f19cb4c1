"""What later rounds are worth, learned online (pure): per domain and tier, how often round k changed
the answer of round k-1, over each round's most recent requests.

A round that changes almost no answers cannot make any right: where the last rounds under a ceiling
have changed fewer than `max_change_rate` of the answers across at least `min_samples` recent
requests, the effective ceiling comes down, one round at a time, never below the plan's floor and
never above the configured ceiling. Where they change answers again, it goes back up. Rounds above
a lowered ceiling keep being measured: a share `explore` of the requests (chosen by a hash of the
session, so reproducibly) still runs to the configured ceiling.

Chain requests in rounds mode feed it; Tree-of-Thought nodes and thinking segments are other things
than rounds of a chain and do not. A change is what a round can buy, so no change is the evidence
that it buys nothing; feedback says what the changes bought: when a request whose round k changed
its answer is judged (POST /v1/feedback), round k's change is counted right or wrong, and once
`min_judged` of its changes were judged, only the share that ended right counts as paying (a round
whose changes make answers wrong does not earn its tokens either). Requests awaiting feedback are
kept in memory only (the most recent `awaiting` of them); the judged counts persist.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field


class DepthValueConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Lower ceilings where later rounds do not change answers.")
    window: int = Field(200, ge=10, le=100_000, description="Recent requests kept per domain, tier, round.")
    min_samples: int = Field(
        50, ge=5, le=100_000, description="Requests that ran a round before its value is judged."
    )
    max_change_rate: float = Field(
        0.02, ge=0.0, le=1.0, description="A round that changes fewer answers than this does not pay."
    )
    explore: float = Field(
        0.05, ge=0.0, le=1.0, description="Share of requests run to the configured ceiling anyway."
    )
    min_judged: int = Field(
        10, ge=1, le=100_000, description="A round's changes judged by feedback before they weigh in."
    )
    awaiting: int = Field(
        10_000, ge=0, le=1_000_000, description="Recent requests whose changes wait for feedback."
    )


@dataclass
class DepthValue:
    cfg: DepthValueConfig
    # "domain|tier" -> per round index k >= 1: did round k change round k-1's answer, recent first out
    seen: dict[str, list[deque[bool]]] = field(default_factory=dict)
    # "domain|tier" -> per round: of the changes feedback judged, did the request end right
    judged: dict[str, list[deque[bool]]] = field(default_factory=dict)
    # request id -> its key and changes, until its feedback comes (or newer requests push it out)
    _awaiting: OrderedDict[str, tuple[str, tuple[bool, ...]]] = field(default_factory=OrderedDict)

    def observe(self, domain: str, tier: str, changed: Sequence[bool], request_id: str | None = None) -> None:
        """One chain request's rounds after the first: whether each changed the previous answer."""
        key = _key(domain, tier)
        _append(self.seen.setdefault(key, []), enumerate(changed), self.cfg.window)
        if request_id and any(changed) and self.cfg.awaiting:
            self._awaiting[request_id] = (key, tuple(bool(c) for c in changed))
            self._awaiting.move_to_end(request_id)
            while len(self._awaiting) > self.cfg.awaiting:
                self._awaiting.popitem(last=False)

    def judge(self, request_id: str, correct: bool) -> bool:
        """Feedback on a request: each round that changed its answer gets the verdict. False when the
        request changed nothing (or is no longer remembered): nothing to learn."""
        item = self._awaiting.pop(request_id, None)
        if item is None:
            return False
        key, changed = item
        _append(
            self.judged.setdefault(key, []),
            ((k, correct) for k, c in enumerate(changed) if c),
            self.cfg.window,
        )
        return True

    def useful_rate(self, domain: str, tier: str, round_index: int) -> tuple[int, float | None]:
        """`rate`, times the share of round `round_index`'s judged changes that ended right once
        enough were judged: the changes that paid."""
        n, r = self.rate(domain, tier, round_index)
        judged = self.judged.get(_key(domain, tier), [])
        k = round_index - 1
        if r is not None and 0 <= k < len(judged) and len(judged[k]) >= self.cfg.min_judged:
            r *= sum(judged[k]) / len(judged[k])
        return n, r

    def rate(self, domain: str, tier: str, round_index: int) -> tuple[int, float | None]:
        """(requests seen, share whose answer round `round_index` (>= 1) changed) over the window."""
        rounds = self.seen.get(_key(domain, tier), [])
        k = round_index - 1
        if round_index < 1 or k >= len(rounds) or not rounds[k]:
            return 0, None
        d = rounds[k]
        return len(d), sum(d) / len(d)

    def ceiling(self, domain: str, tier: str, floor: int, ceiling: int) -> tuple[int, str]:
        """The effective ceiling (floor..ceiling) and why: the last rounds are dropped while each
        changed too few answers across enough recent requests."""
        if not self.cfg.enabled:
            return ceiling, "off"
        eff = ceiling
        while eff > max(floor, 1):
            n, r = self.useful_rate(domain, tier, eff - 1)  # the last round under `eff` has index eff - 1
            if n < self.cfg.min_samples or r is None or r > self.cfg.max_change_rate:
                break
            eff -= 1
        if eff == ceiling:
            n, r = self.useful_rate(domain, tier, ceiling - 1)
            if n < self.cfg.min_samples:
                return eff, f"round {ceiling}: {n} of {self.cfg.min_samples} requests seen"
            return eff, f"round {ceiling} changed {r:.1%} of answers (over {n})"
        n, r = self.useful_rate(domain, tier, eff)
        return (
            eff,
            f"round {eff + 1} changed {r:.1%} of answers over {n} requests "
            f"(<= {self.cfg.max_change_rate:.0%}; changes feedback judged wrong do not count)",
        )

    def explores(self, session_id: str) -> bool:
        """Whether this session runs to the configured ceiling to keep measuring (hash-chosen)."""
        h = int.from_bytes(hashlib.sha256(session_id.encode()).digest()[:8], "big")
        return h / 2**64 < self.cfg.explore

    def summary(self) -> dict[str, dict]:
        """Per "domain|tier": each round's requests seen and change rate, and what feedback judged."""
        out: dict[str, dict] = {}
        for key, rounds in self.seen.items():
            judged = self.judged.get(key, [])
            out[key] = {}
            for k, d in enumerate(rounds):
                if not d:
                    continue
                row = {"requests": len(d), "changed": sum(d), "change_rate": round(sum(d) / len(d), 4)}
                if k < len(judged) and judged[k]:
                    row |= {"changes_judged": len(judged[k]), "changes_right": sum(judged[k])}
                out[key][f"round_{k + 2}"] = row
        return out

    def snapshot(self) -> dict:
        """JSON-able state (bits as strings of 0/1: compact, never pickled)."""
        return {"version": 2, "seen": _bits(self.seen), "judged": _bits(self.judged)}

    @classmethod
    def restore(cls, cfg: DepthValueConfig, snap: dict | None) -> DepthValue:
        """From `snapshot` (or version 1's: the `seen` mapping alone); damage costs statistics only."""
        dv = cls(cfg)
        snap = snap if isinstance(snap, dict) else {}
        versioned = snap.get("version") == 2
        dv.seen = _unbits(snap.get("seen") if versioned else snap, cfg.window)
        dv.judged = _unbits(snap.get("judged"), cfg.window) if versioned else {}
        return dv


def _append(rounds: list[deque[bool]], items, window: int) -> None:
    """Append (round index, bit) pairs, growing the per-round windows as needed."""
    for k, bit in items:
        while len(rounds) <= k:
            rounds.append(deque(maxlen=window))
        rounds[k].append(bool(bit))


def _bits(table: dict[str, list[deque[bool]]]) -> dict[str, list[str]]:
    return {key: ["".join("1" if b else "0" for b in d) for d in rounds] for key, rounds in table.items()}


def _unbits(raw: object, window: int) -> dict[str, list[deque[bool]]]:
    out: dict[str, list[deque[bool]]] = {}
    for key, rounds in (raw if isinstance(raw, dict) else {}).items():
        if not isinstance(key, str) or not isinstance(rounds, list) or key == "version":
            continue  # a damaged entry costs its statistics, nothing else
        out[key] = [
            deque((c == "1" for c in bits if c in "01"), maxlen=window)
            if isinstance(bits, str)
            else deque(maxlen=window)
            for bits in rounds
        ]
    return out


def _key(domain: str, tier: str) -> str:
    return f"{domain}|{tier}"
