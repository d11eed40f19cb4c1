"""A sliding window of per-second counts over the last minute (pure): per-key request and token
rates (services/ingress/auth.py) and depth control's per-key token budget (services/reasoning/budgets.py)."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

WINDOW_S = 60


@dataclass
class Window:
    """Counts over the last WINDOW_S seconds: at most WINDOW_S (second, count) buckets, oldest first."""

    buckets: deque[tuple[int, int]] = field(default_factory=deque)

    def add(self, n: int, now: float) -> None:
        # A clock that steps back adds to the newest bucket, so buckets stay ordered.
        sec = max(int(now), self.buckets[-1][0]) if self.buckets else int(now)
        if self.buckets and self.buckets[-1][0] == sec:
            self.buckets[-1] = (sec, self.buckets[-1][1] + n)
        else:
            self.buckets.append((sec, n))
        self.trim(now)

    def trim(self, now: float) -> None:
        while self.buckets and self.buckets[0][0] <= int(now) - WINDOW_S:
            self.buckets.popleft()

    def total(self, now: float) -> int:
        self.trim(now)
        return sum(n for _, n in self.buckets)

    def retry_after(self, now: float, limit: int) -> int:
        """Whole seconds until the total is below `limit` again, at least 1."""
        total = self.total(now)
        for sec, n in self.buckets:
            total -= n
            if total < limit:
                return max(1, math.ceil(sec + WINDOW_S - now))
        return 1
