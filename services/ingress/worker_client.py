"""The router's side of the reasoning workers: one round streamed (resumed on another worker if its
worker dies, services/loop/resume.py), n children of a prompt in one engine request (Tree-of-Thought),
the engine's facts. Calls go through the worker deployment's Serve handle; the session travels as
an explicit argument, which the affinity router (services/worker/affinity.py) reads, with `follow`
for calls that go to the session's worker without moving it (a round's closing, a thinking probe).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray.exceptions import ActorUnavailableError, RayActorError

from services.loop.resume import budget_spent, rebase, resumed
from services.worker.deployment import delta_from_dict, result_from_dict
from services.worker.engine import GenerateDelta, GenerateResult, SamplingSpec

log = logging.getLogger("ponder.router")
# A worker replica that died under a round (Serve's router then stops choosing it).
WORKER_GONE = (RayActorError, ActorUnavailableError)


class WorkerClient:
    def __init__(self, handle: Any, retries: int, on_retry: Callable[[str], None] = lambda op: None) -> None:
        self.handle, self.retries, self.on_retry = handle, retries, on_retry

    async def engine_info(self) -> dict:
        return await self.handle.engine_info.remote()

    async def generate(
        self, request_id: str, prompt: list[int], spec: SamplingSpec
    ) -> AsyncIterator[GenerateDelta]:
        """One round, streamed; resumed on another worker if its worker dies mid-round."""
        done: list[int] = []
        for attempt in range(self.retries + 1):
            nxt = resumed(spec, prompt, done)
            if nxt is None:
                yield budget_spent(len(prompt))
                return
            full, sub = nxt
            rid = request_id if attempt == 0 else f"{request_id}~{attempt}"  # vLLM ids are unique
            carried = len(done)
            stream = self.handle.options(stream=True).generate_stream.remote(
                rid, full, sub.__dict__, session=sub.session, follow=sub.follows
            )
            try:
                async for d in stream:
                    delta = rebase(delta_from_dict(d), carried)
                    done.extend(delta.token_ids)
                    yield delta
                return
            except WORKER_GONE as exc:
                if attempt == self.retries:
                    raise
                self.on_retry("generate")
                log.warning(
                    "round %s: its worker died after %d tokens (%s); resuming on another worker",
                    request_id,
                    len(done),
                    type(exc).__name__,
                )

    async def expand(
        self, request_id: str, prompt: list[int], spec: SamplingSpec, n: int
    ) -> list[GenerateResult]:
        """n children of one prompt in one engine request (shared prefix): Tree-of-Thought. Nothing
        has reached the client yet, so a dead worker's expansion is simply asked again."""
        for attempt in range(self.retries + 1):
            rid = request_id if attempt == 0 else f"{request_id}~{attempt}"
            try:
                results = await self.handle.generate_n.remote(
                    rid, prompt, spec.__dict__, n, session=spec.session
                )
                return [result_from_dict(r) for r in results]
            except WORKER_GONE as exc:
                if attempt == self.retries:
                    raise
                self.on_retry("expand")
                log.warning("expansion %s: its worker died (%s); again", request_id, type(exc).__name__)
        raise AssertionError("unreachable")
