"""Domains' live exit thresholds as depth control grants them at admission (pure; time passed in).

Thresholds move when feedback raises them or an operator sets them; the records actor writes them
to the control plane's state file. Depth control re-reads that table at most once per `refresh_s`
(a versioned pull: a domain's version is when it was last set, 0 for the configured value), so a
change reaches every new admission — on every router — within `refresh_s`, and an admission costs
no SQLite read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.reasoning.domains import DomainRegistry


@dataclass(frozen=True)
class Threshold:
    value: float | None  # None: the domain has none (the tier's holds)
    version: float  # when it was last set; 0 = as configured in domains.yaml


class LiveThresholds:
    def __init__(
        self, registry: DomainRegistry, read: Callable[[], dict[str, dict]], refresh_s: float
    ) -> None:
        self.registry, self.read, self.refresh_s = registry, read, refresh_s
        self._live: dict[str, dict] = {}
        self._read_at: float | None = None

    def get(self, domain: str, now: float) -> Threshold:
        if self._read_at is None or now - self._read_at >= self.refresh_s or now < self._read_at:
            self._live, self._read_at = self.read(), now
        live = self._live.get(domain)
        if live is not None:
            return Threshold(float(live["value"]), float(live["updated_at"]))
        d = self.registry.domains.get(domain)
        return Threshold(None if d is None else d.threshold, 0.0)
