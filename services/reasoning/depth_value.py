"""What later rounds are worth, learned online (pure): per domain and tier, how often round k changed
the answer of round k-1, over each round's most recent requests.

A round that changes almost no answers cannot make any right: where the last rounds under a ceiling
have changed fewer than `max_change_rate` of the answers across at least `min_samples` recent
requests, the effective ceiling comes down, one round at a time, never below the plan's floor and
never above the configured ceiling. Where they change answers again, it goes back up. Rounds above
a lowered ceiling keep being measured: a share `explore` of the requests (chosen by a hash of the
session, so reproducibly) still runs to the configured ceiling.

Chain requests in rounds mode feed it; Tree-of-Thought nodes and thinking segments are other things
than rounds of a chain and do not. Whether a change made an answer right (feedback, calibration) is
not used yet: a change is what a round can buy, so no change is the evidence that it buys nothing.
"""

from __future__ import annotations

import hashlib
from collections import deque
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


@dataclass
class DepthValue:
    cfg: DepthValueConfig
    # "domain|tier" -> per round index k >= 1: did round k change round k-1's answer, recent first out
    seen: dict[str, list[deque[bool]]] = field(default_factory=dict)

    def observe(self, domain: str, tier: str, changed: Sequence[bool]) -> None:
        """One chain request's rounds after the first: whether each changed the previous answer."""
        rounds = self.seen.setdefault(_key(domain, tier), [])
        for k, c in enumerate(changed):
            while len(rounds) <= k:
                rounds.append(deque(maxlen=self.cfg.window))
            rounds[k].append(bool(c))

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
            n, r = self.rate(domain, tier, eff - 1)  # the last round under `eff` has index eff - 1
            if n < self.cfg.min_samples or r is None or r > self.cfg.max_change_rate:
                break
            eff -= 1
        if eff == ceiling:
            n, r = self.rate(domain, tier, ceiling - 1)
            if n < self.cfg.min_samples:
                return eff, f"round {ceiling}: {n} of {self.cfg.min_samples} requests seen"
            return eff, f"round {ceiling} changed {r:.1%} of answers (over {n})"
        n, r = self.rate(domain, tier, eff)
        return (
            eff,
            f"round {eff + 1} changed {r:.1%} of answers over {n} requests "
            f"(<= {self.cfg.max_change_rate:.0%})",
        )

    def explores(self, session_id: str) -> bool:
        """Whether this session runs to the configured ceiling to keep measuring (hash-chosen)."""
        h = int.from_bytes(hashlib.sha256(session_id.encode()).digest()[:8], "big")
        return h / 2**64 < self.cfg.explore

    def summary(self) -> dict[str, dict]:
        """Per "domain|tier": each round's requests seen and change rate."""
        out: dict[str, dict] = {}
        for key, rounds in self.seen.items():
            out[key] = {
                f"round_{k + 2}": {
                    "requests": len(d),
                    "changed": sum(d),
                    "change_rate": round(sum(d) / len(d), 4),
                }
                for k, d in enumerate(rounds)
                if d
            }
        return out

    def snapshot(self) -> dict:
        """JSON-able state (bits as strings of 0/1: compact, never pickled)."""
        return {
            key: ["".join("1" if b else "0" for b in d) for d in rounds] for key, rounds in self.seen.items()
        }

    @classmethod
    def restore(cls, cfg: DepthValueConfig, snap: dict | None) -> DepthValue:
        dv = cls(cfg)
        for key, rounds in (snap or {}).items():
            if not isinstance(key, str) or not isinstance(rounds, list):
                continue  # a damaged entry costs its statistics, nothing else
            dv.seen[key] = [
                deque((c == "1" for c in bits if c in "01"), maxlen=cfg.window)
                if isinstance(bits, str)
                else deque(maxlen=cfg.window)
                for bits in rounds
            ]
        return dv


def _key(domain: str, tier: str) -> str:
    return f"{domain}|{tier}"
