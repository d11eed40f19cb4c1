"""When loading a prefix from the store beats recomputing it: a cost model fed by measurements.

    load_s      = latency + bytes / load_bandwidth
    recompute_s = tokens / prefill_rate

Both rates are exponentially weighted averages of what the engine actually measured (loads timed
by the connector, prefill steps timed between load and save), seeded with conservative defaults
until the first measurements arrive. A load is chosen only when it is predicted to be faster by
`margin` (loads also cost store memory bandwidth shared with other engines).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CostModel:
    prefill_tokens_per_s: float = 2000.0  # CPU, small model: measured ~1-4k tok/s on 2 cores
    load_bytes_per_s: float = 1.0e9
    load_latency_s: float = 0.005  # a Ray call to the shard and back
    margin: float = 1.2
    alpha: float = 0.3  # weight of each new measurement
    min_tokens: int = 1  # never bother with fewer

    def load_s(self, nbytes: int) -> float:
        return self.load_latency_s + nbytes / self.load_bytes_per_s

    def recompute_s(self, tokens: int) -> float:
        return tokens / self.prefill_tokens_per_s

    def should_load(self, tokens: int, nbytes: int) -> bool:
        return tokens >= self.min_tokens and self.load_s(nbytes) * self.margin < self.recompute_s(tokens)

    def _ewma(self, old: float, new: float) -> float:
        return (1 - self.alpha) * old + self.alpha * new

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.prefill_tokens_per_s = self._ewma(self.prefill_tokens_per_s, tokens / seconds)

    def observe_load(self, nbytes: int, seconds: float) -> None:
        """A load's time; its bandwidth net of the fixed latency (floored at 1% of the total time)."""
        if nbytes <= 0 or seconds <= 0:
            return
        transfer = max(seconds - self.load_latency_s, seconds * 0.01)
        self.load_bytes_per_s = self._ewma(self.load_bytes_per_s, nbytes / transfer)

    def snapshot(self) -> dict:
        return {
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 1),
            "load_bytes_per_s": round(self.load_bytes_per_s),
            "load_latency_s": self.load_latency_s,
        }
