"""The connector's metrics, from inside vLLM's engine process (a Ray driver: Ray's metrics API works
there too). One set per process, shared by both connector roles; a no-op without Ray."""

from __future__ import annotations

import threading
import time
from typing import Any

LATENCY_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

_lock = threading.Lock()
_instance: ConnectorMetrics | None = None


class ConnectorMetrics:
    def __init__(self, cost: Any, refresh_s: float = 10.0) -> None:
        from ray.util import metrics

        self.blocks = metrics.Counter(
            "ponder_kv_connector_blocks",
            "Blocks moved by engines' KV connectors: loaded, load_failed (recomputed), saved.",
            tag_keys=("op",),
        )
        self.rejected = metrics.Counter(
            "ponder_kv_connector_rejected",
            "Blocks the codec refused on load, by reason.",
            tag_keys=("reason",),
        )
        self.lookups = metrics.Counter(
            "ponder_kv_connector_lookups",
            "Prompt lookups in the store by result: hit (a load), miss, recompute_cheaper.",
            tag_keys=("result",),
        )
        self.seconds = metrics.Histogram(
            "ponder_kv_connector_seconds",
            "Time of a step's loads or saves.",
            boundaries=list(LATENCY_S),
            tag_keys=("op",),
        )
        self.rates = metrics.Gauge(
            "ponder_kv_cost_model",
            "The cost model's measured rates (prefill tokens/s, load bytes/s).",
            tag_keys=("rate",),
        )
        self.cost = cost
        self.refresh_s = refresh_s
        threading.Thread(target=self._gauges, name="ponder-kv-gauges", daemon=True).start()

    def _gauges(self) -> None:
        while True:  # Ray drops a gauge ~25 s after its last set: keep them alive
            self.rates.set(self.cost.prefill_tokens_per_s, tags={"rate": "prefill_tokens_per_s"})
            self.rates.set(self.cost.load_bytes_per_s, tags={"rate": "load_bytes_per_s"})
            time.sleep(self.refresh_s)

    def moved(self, op: str, n: int, seconds: float | None = None) -> None:
        if n > 0:
            self.blocks.inc(n, tags={"op": op})
        if seconds is not None:
            self.seconds.observe(seconds, tags={"op": op})


class _Null:
    def __getattr__(self, name: str) -> Any:
        return _Null()

    def __call__(self, *args: Any, **kwargs: Any) -> _Null:
        return self


def connector_metrics(cost: Any) -> Any:
    """This process's metrics (created once), or a no-op when Ray is not connected."""
    global _instance
    try:
        import ray

        if not ray.is_initialized():
            return _Null()
    except ImportError:
        return _Null()
    with _lock:
        if _instance is None:
            _instance = ConnectorMetrics(cost)
        return _instance
