"""Session affinity for reasoning rounds: a session's next round goes to the worker that ran its last.

That worker's local prefix cache holds the session's KV, so the round computes only what is new.
When that worker is busy (its queue at `max_queue` or more) the round goes to the least-loaded other
worker instead and the KV store supplies the prefix there. `rank` is the pure policy; the
`SessionAffinityRouter` shell plugs it into Ray Serve as the worker deployment's request router.
Affinity is per router replica (each keeps its own table); a miss costs a store load, not an error.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any

from ray.serve._private.request_router.request_router import RequestRouter

MAX_SESSIONS = 100_000


def rank(holder: str | None, queues: dict[str, int], max_queue: int, follow: bool = False) -> list[list[str]]:
    """Replica ids in order of preference, one per rank: the holder first unless it is busy, then by
    queue length (ties broken by id, so the order is reproducible). A following call (`follow`: a
    round's closing, a probe) goes to the holder however busy: the prefix it extends is cached there,
    and it is a few tokens."""
    others = sorted((r for r in queues if r != holder), key=lambda r: (queues[r], r))
    if holder in queues:
        if follow or queues[holder] < max_queue:
            return [[holder], *([r] for r in others)]
        return [*([r] for r in others), [holder]]
    return [[r] for r in others]


def session_of(kwargs: Any) -> str | None:
    """The session a worker call names: its `session` keyword (services/ingress/worker_client.py)."""
    session = kwargs.get("session") if isinstance(kwargs, dict) else None
    return session if isinstance(session, str) and session else None


def moves_holder(kwargs: Any) -> bool:
    """Whether a call makes its replica the session's holder: a round does; a call marked `follow`
    (a round's closing, a thinking probe: routed to the holder, never stored) does not, so that a
    round spilled to another worker is not followed there by the session's next round."""
    return session_of(kwargs) is not None and not kwargs.get("follow")


class SessionAffinityRouter(RequestRouter):
    def initialize_state(self, max_queue: int = 4, **kwargs: Any) -> None:
        self.max_queue = max_queue
        self.holders: OrderedDict[str, str] = OrderedDict()
        self.stats = {"affinity_hits": 0, "affinity_spills": 0, "new_sessions": 0}

    async def choose_replicas(self, candidate_replicas: list, pending_request: Any = None) -> list[list]:
        session = session_of(pending_request.kwargs) if pending_request is not None else None
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if session is None:
            two = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
            return [two]  # Serve probes both and takes the shorter queue (power of two choices)
        cache = self._replica_queue_len_cache
        queues = {rid: cache.get(r.replica_id) or 0 for rid, r in by_id.items()}
        holder = self.holders.get(session)
        follow = not moves_holder(pending_request.kwargs)
        order = rank(holder, queues, self.max_queue, follow)
        if not follow:  # the counts are the rounds'
            self._count(holder, order)
        return [[by_id[rid] for rid in group] for group in order]

    def _count(self, holder: str | None, order: list[list[str]]) -> None:
        if holder is None:
            self.stats["new_sessions"] += 1
        elif order[:1] == [[holder]]:
            self.stats["affinity_hits"] += 1
        else:
            self.stats["affinity_spills"] += 1

    def on_request_routed(self, pending_request: Any, replica_id: Any, result: Any) -> None:
        if not moves_holder(pending_request.kwargs):
            return
        session = session_of(pending_request.kwargs)
        self.holders[session] = replica_id.unique_id
        self.holders.move_to_end(session)
        if len(self.holders) > MAX_SESSIONS:
            self.holders.popitem(last=False)
