"""The router: Ray Serve FastAPI ingress speaking OpenAI's chat API, running the reasoning loop.

Shell only: validation shapes live in `services.ingress.api`, the loop in
`services.loop.orchestrator`, response formatting in `services.ingress.responses`; this file wires
them to Serve handles and the depth-control actor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle

from services.config import AppConfig
from services.control.client import Control, DepthClient
from services.control.depth_control import get_or_create
from services.ingress import access, responses
from services.ingress.api import (
    ERROR_RESPONSES,
    ApiError,
    BodyLimit,
    ChatRequest,
    FeedbackRequest,
    ReasoningOptions,
    ReviewDecision,
    install_error_handlers,
)
from services.ingress.metrics import Recorder, log_request, log_round, send_logs_to_replica_log
from services.loop.orchestrator import ContextLengthError, Event, Finished, Orchestrator, RoundDone
from services.loop.resume import budget_spent, rebase, resumed
from services.loop.tokenizer import HfTokenizer
from services.provision import start_publisher, start_store
from services.reasoning.complexity import ComplexityConfig, pick_tier
from services.reasoning.domains import DomainRegistry, detect_domain
from services.reasoning.tiers import PlanError, RoundPlan, TierTable, make_plan
from services.worker.deployment import delta_from_dict, result_from_dict
from services.worker.engine import GenerateDelta, GenerateResult, SamplingSpec

REVIEW_STATUSES = ("pending", "approved", "rejected")

log = logging.getLogger("ponder.router")
# A worker replica that died under a round (Serve's router then stops choosing it).
WORKER_GONE = (RayActorError, ActorUnavailableError)

app = FastAPI(
    title="Ponder",
    version="0.1.0",
    description="Multi-round reasoning, OpenAI-compatible",
    responses=ERROR_RESPONSES,  # /openapi.json describes the errors this API really sends
)
install_error_handlers(app)
app.add_middleware(BodyLimit)  # 431/413 from the router's config, before a handler reads the request


access.install(app)  # added last, so it runs first: no key, no further look at the request


@serve.deployment(name="Router")
@serve.ingress(app)
class Router:
    def __init__(self, config: dict, worker: DeploymentHandle) -> None:
        self.cfg = AppConfig.model_validate(config)
        self.rcfg = self.cfg.router
        app.state.max_body_bytes = self.rcfg.max_body_bytes
        app.state.max_header_bytes = self.rcfg.max_header_bytes
        send_logs_to_replica_log()
        self.auth = app.state.auth = access.load(self.cfg.auth)  # None: no keys configured
        self.worker = worker
        self.model = self.cfg.engine.model
        self.tiers = TierTable.load(self.cfg.depth_control.tiers_file)
        self.complexity = ComplexityConfig.load(self.rcfg.complexity_file)
        self.domains = DomainRegistry.load(self.cfg.depth_control.domains_file)
        self.tokenizer = HfTokenizer(self.cfg.engine.model_path or "")
        self.depth = get_or_create(self.cfg.depth_control)
        self.metrics = Recorder()
        self.control = DepthClient(
            self.depth,
            self.rcfg.depth_control_timeout_s,
            self.rcfg.tot_grant_wait_s,
            on_decision=self.metrics.decision_latency,
        )
        self._orchestrator: Orchestrator | None = None
        self.created = int(time.time())
        self.kv = start_store(self.cfg)  # KV shards on every node, or None when the store is off
        if self.kv is not None:
            start_publisher(self.kv)

    async def _orch(self) -> Orchestrator:
        if self._orchestrator is None:
            info = await self.worker.engine_info.remote()
            self._orchestrator = Orchestrator(
                self._generate,
                self._no_decide,  # every request brings its own decider (DepthClient.decider)
                self.tokenizer,
                expand=self._expand,
                vocab_size=info["vocab_size"],
                max_model_len=info["max_model_len"],
                min_round_tokens=self.rcfg.min_round_tokens,
            )
        return self._orchestrator

    async def _generate(
        self, request_id: str, prompt: list[int], spec: SamplingSpec
    ) -> AsyncIterator[GenerateDelta]:
        """One round, streamed; resumed on another worker if its worker dies (services/loop/resume.py)."""
        done: list[int] = []
        for attempt in range(self.rcfg.round_retries + 1):
            nxt = resumed(spec, prompt, done)
            if nxt is None:
                yield budget_spent(len(prompt))
                return
            full, sub = nxt
            rid = request_id if attempt == 0 else f"{request_id}~{attempt}"  # vLLM ids are unique
            carried = len(done)
            stream = self.worker.options(stream=True).generate_stream.remote(rid, full, sub.__dict__)
            try:
                async for d in stream:
                    delta = rebase(delta_from_dict(d), carried)
                    done.extend(delta.token_ids)
                    yield delta
                return
            except WORKER_GONE as exc:
                if attempt == self.rcfg.round_retries:
                    raise
                self.metrics.retry("generate")
                log.warning(
                    "round %s: its worker died after %d tokens (%s); resuming on another worker",
                    request_id,
                    len(done),
                    type(exc).__name__,
                )

    async def _expand(
        self, request_id: str, prompt: list[int], spec: SamplingSpec, n: int
    ) -> list[GenerateResult]:
        """n children of one prompt in one engine request (shared prefix): Tree-of-Thought. Nothing
        has reached the client yet, so a dead worker's expansion is simply asked again."""
        for attempt in range(self.rcfg.round_retries + 1):
            rid = request_id if attempt == 0 else f"{request_id}~{attempt}"
            try:
                results = await self.worker.generate_n.remote(rid, prompt, spec.__dict__, n)
                return [result_from_dict(r) for r in results]
            except WORKER_GONE as exc:
                if attempt == self.rcfg.round_retries:
                    raise
                self.metrics.retry("expand")
                log.warning("expansion %s: its worker died (%s); again", request_id, type(exc).__name__)
        raise AssertionError("unreachable")

    @staticmethod
    async def _no_decide(*_: object) -> None:
        return None

    def _plan(self, req: ChatRequest, domain_threshold: float | None = None) -> tuple[RoundPlan, str, str]:
        """The request's plan, why its tier and why its domain: named by the request, or scored
        and detected from its prompt."""
        r = req.reasoning or ReasoningOptions()
        user_text = "\n".join(m.text() for m in req.messages if m.role == "user")
        tier, tier_reason = pick_tier(r.tier, user_text, self.complexity)
        if r.domain is not None and r.domain not in self.domains.domains:
            raise ApiError(
                400,
                f"unknown domain {r.domain!r}; use one of {', '.join(self.domains.domains)}",
                param="reasoning.domain",
            )
        domain, domain_reason = (
            (r.domain, "requested") if r.domain else detect_domain(user_text, self.domains)
        )
        try:
            plan = make_plan(
                self.tiers,
                tier,
                max_rounds=r.max_rounds,
                min_rounds=r.min_rounds,
                confidence_threshold=r.confidence_threshold,
                strategy=r.strategy,
                domain=domain,
                domain_threshold=domain_threshold,
                tot=r.tot.model_dump(exclude_none=True) if r.tot else None,
            )
        except PlanError as exc:
            raise ApiError(400, str(exc), param=exc.param) from exc
        return plan, tier_reason, domain_reason

    async def _admit(
        self, rid: str, key: str, req: ChatRequest, plan: RoundPlan, control: Control
    ) -> RoundPlan:
        """Admission by depth control: the domain's live threshold, ceilings lowered under pressure."""
        adm = await self.control.admit(rid, key, plan, control)
        if adm is None:
            return plan
        if adm["domain_threshold"] is not None:
            plan, _, _ = self._plan(req, adm["domain_threshold"])
        control.degraded, control.reasons = adm["degraded"], adm["reasons"]
        if adm["max_rounds"] < plan.max_rounds or adm["min_rounds"] < plan.min_rounds:
            plan = dataclasses.replace(
                plan,
                max_rounds=min(plan.max_rounds, adm["max_rounds"]),
                min_rounds=min(plan.min_rounds, adm["min_rounds"]),
                degraded=adm["degraded"],
            )
        return plan

    async def _session(
        self, rid: str, key: str, events: AsyncIterator[Event], control: Control, plan: RoundPlan
    ) -> AsyncIterator[Event]:
        """Pass the events through; whatever happens, tell depth control the session ended and
        record the request's metrics and log lines."""
        record, outcome, status = None, None, "error"
        try:
            async for ev in events:
                if isinstance(ev, RoundDone):
                    self.metrics.round(plan.tier, ev.record, ev.verdict, ev.verdict.exit)
                    log_round(rid, plan, ev.record, ev.verdict)
                if isinstance(ev, Finished):
                    outcome, status = ev.outcome, "ok"
                    o = ev.outcome
                    last = o.rounds[-1] if o.rounds else None
                    record = {
                        "domain": o.plan.domain or self.domains.default_domain,
                        "tier": o.plan.tier,
                        "strategy": o.plan.strategy,
                        "exit_reason": o.exit_reason.value,
                        "confidence": None if last is None else last.confidence,
                        "rounds": len(o.rounds),
                        "completion_tokens": o.total_completion_tokens,
                    }
                yield ev
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"  # the client went away
            raise
        finally:
            self.metrics.request(outcome, plan.tier, plan.strategy, status, control.reasons)
            log_request(rid, plan, outcome, status, control, api_key=key if self.auth is not None else "-")
            access.record_tokens(self.auth, key, outcome.total_completion_tokens if outcome else 0)
            self.control.finish(rid, key, record)
            if self.kv is not None:
                # Its trace goes first when a shard needs room (kept while there is room).
                self.kv.notify(rid, "mark_exited", rid)

    def _sampling(self, req: ChatRequest) -> SamplingSpec:
        cap = req.max_completion_tokens or req.max_tokens or self.rcfg.default_max_tokens
        if cap > self.rcfg.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens must be at most {self.rcfg.max_tokens_limit} per round; got {cap}",
                param="max_tokens",
            )
        temperature = self.rcfg.default_temperature if req.temperature is None else req.temperature
        return SamplingSpec(
            max_tokens=cap,
            temperature=temperature,
            top_p=req.top_p or 1.0,
            seed=req.seed,
            stop=req.stop_list(),
            top_logprobs=self.rcfg.top_logprobs,
            ignore_eos=req.ignore_eos,
        )

    def _validate(self, req: ChatRequest) -> None:
        if req.model != self.model:
            raise ApiError(
                404,
                f"The model '{req.model}' does not exist; this server serves '{self.model}'.",
                param="model",
                code="model_not_found",
            )
        if len(req.messages) > self.rcfg.max_messages:
            raise ApiError(
                400,
                f"At most {self.rcfg.max_messages} messages per request; got {len(req.messages)}.",
                param="messages",
            )

    @app.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatRequest, request: Request):
        self._validate(req)
        (plan, tier_reason, domain_reason), sampling = self._plan(req), self._sampling(req)
        if (refused := access.check_chat(self.auth, access.caller(request), plan.tier)) is not None:
            return refused  # 403: a tier the key may not use; 429: its tokens per minute are used up
        orch = await self._orch()
        conversation = req.conversation()
        try:
            first_prompt = orch.first_prompt(conversation)  # checked here: a 400 before any stream
        except ContextLengthError as exc:
            raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from exc
        rid, key, control = responses.new_id(), access.key_id(request), Control()
        if self.kv is not None and (req.reasoning is None or req.reasoning.kv_store is not False):
            sampling = dataclasses.replace(sampling, kv_tags=(rid, 0, ""))  # the session is the request
        plan = await self._admit(rid, key, req, plan, control)
        grant, release = self.control.nodes(rid, control)
        events = self._session(
            rid,
            key,
            orch.run(
                rid,
                conversation,
                plan,
                sampling,
                first_prompt,
                decide=self.control.decider(control),
                grant_nodes=grant,
                release_nodes=release,
            ),
            control,
            plan,
        )
        meta = responses.Meta(rid, self.model, int(time.time()), tier_reason, domain_reason, control)
        if plan.review:
            # The verified answer is held for a human: 202 with the review's id, released on approval.
            body = await responses.complete(events, meta)
            review = await self.control.durable(
                "create_review",
                responses.review_id(rid),
                rid,
                plan.tier,
                plan.domain or self.domains.default_domain,
                responses.proposed(body),
                body,
            )
            return JSONResponse(responses.review_view(review), status_code=202)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                responses.sse(events, meta, include_usage), media_type="text/event-stream"
            )
        return JSONResponse(await responses.complete(events, meta))

    @app.post("/v1/feedback")
    async def feedback(self, body: FeedbackRequest) -> JSONResponse:
        """Was a completion's answer correct? Updates its domain's statistics (and threshold)."""
        return JSONResponse(await self.control.durable("feedback", body.request_id, body.correct))

    @app.get("/v1/domains")
    async def list_domains(self) -> JSONResponse:
        return JSONResponse(await self.control.durable("domains"))

    @app.get("/v1/reviews")
    async def list_reviews(self, status: str | None = None, limit: int = 100) -> JSONResponse:
        if status is not None and status not in REVIEW_STATUSES:
            raise ApiError(400, f"status must be one of {', '.join(REVIEW_STATUSES)}", param="status")
        if not 1 <= limit <= 1000:
            raise ApiError(400, f"limit must be between 1 and 1000; got {limit}", param="limit")
        rows = await self.control.durable("list_reviews", status, limit)
        return JSONResponse({"object": "list", "data": [responses.review_view(r) for r in rows]})

    @app.get("/v1/reviews/{review_id}")
    async def get_review(self, review_id: str) -> JSONResponse:
        row = await self.control.durable("get_review", review_id)
        if row is None:
            raise ApiError(404, f"no review {review_id!r}", param="review_id", code="not_found")
        return JSONResponse(responses.review_view(row))

    @app.post("/v1/reviews/{review_id}/approve")
    async def approve(self, review_id: str, body: ReviewDecision | None = None) -> JSONResponse:
        return await self._decide_review(review_id, True, body)

    @app.post("/v1/reviews/{review_id}/reject")
    async def reject(self, review_id: str, body: ReviewDecision | None = None) -> JSONResponse:
        return await self._decide_review(review_id, False, body)

    async def _decide_review(
        self, review_id: str, approve: bool, body: ReviewDecision | None
    ) -> JSONResponse:
        body = body or ReviewDecision()
        row = await self.control.durable("decide_review", review_id, approve, body.reviewer, body.note)
        return JSONResponse(responses.review_view(row))

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": self.model, "object": "model", "created": self.created, "owned_by": "ponder"}],
        }

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            await asyncio.wait_for(self.depth.ping.remote(), self.rcfg.depth_control_timeout_s)
            depth = "ok"
        except Exception:  # reported, not fatal: routers keep deciding with local ceilings
            depth = "unreachable"
        return JSONResponse({"status": "ok", "model": self.model, "depth_control": depth})
