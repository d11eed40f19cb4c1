"""The router: the Ray Serve FastAPI ingress speaking OpenAI's chat API.

A shell. The chat route reads validate → plan → run the loop → respond; its parts live beside it:
request checks, sampling and session accounting in `chat.py`, the plan in
`services/reasoning/planning.py`, the loop in `services/loop/orchestrator.py`, worker calls in
`worker_client.py`, the control plane in `services/control/client.py`, response shapes in
`responses.py`, the control plane's routes (feedback, domains, reviews) in `control_routes.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from services.config import AppConfig
from services.control.client import Control, DepthClient, RecordsClient
from services.control.launch import find_control
from services.ingress import access, chat, responses
from services.ingress.api import (
    CHAT_LINKS,
    ERROR_RESPONSES,
    ApiError,
    BodyLimit,
    ChatRequest,
    install_error_handlers,
)
from services.ingress.control_routes import routes as control_routes
from services.ingress.metrics import Recorder, send_logs_to_replica_log
from services.ingress.worker_client import WorkerClient
from services.loop.orchestrator import ContextLengthError, Orchestrator
from services.loop.tokenizer import HfTokenizer
from services.provision import store_client
from services.reasoning.complexity import ComplexityConfig
from services.reasoning.domains import DomainRegistry
from services.reasoning.planning import Admission, RequestPlanner
from services.reasoning.prompts import PromptFamilies
from services.reasoning.thinking import markers_in_template
from services.reasoning.tiers import PlanError, TierTable

log = logging.getLogger("ponder.router")
app = FastAPI(
    title="Ponder",
    version="0.1.0",
    description="Multi-round reasoning, OpenAI-compatible",
    responses=ERROR_RESPONSES,  # /openapi.json describes the errors this API really sends
)
install_error_handlers(app)
app.add_middleware(BodyLimit)  # 431/413 from the router's config, before a handler reads the request
app.include_router(control_routes)
access.install(app)  # added last, so it runs first: no key, no further look at the request


async def _no_decide(*_: object) -> None:
    return None


# Serve pickles the class at decoration: whatever its methods use must be defined above this line.
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
        self.model = self.cfg.engine.model
        self.domains, warnings = DomainRegistry.load(self.cfg.depth_control.domains_file).for_model(
            self.cfg.engine.model
        )
        complexity, scorer_warnings = ComplexityConfig.load(self.rcfg.complexity_file).for_model(self.model)
        for w in [*warnings, *scorer_warnings]:
            log.warning("%s", w)
        self.planner = RequestPlanner(
            TierTable.load(self.cfg.depth_control.tiers_file), complexity, self.domains
        )
        self.prompts = PromptFamilies.load(self.rcfg.prompts_file).for_model(self.model)  # resolved at load
        self.tokenizer = HfTokenizer(self.cfg.engine.model_path or "", self.cfg.engine.chat_template)
        # A model that thinks natively: its trace becomes reasoning_content (configured or detected).
        self.trace = self.cfg.engine.reasoning or markers_in_template(self.tokenizer.chat_template)
        self.metrics = Recorder()
        self.workers = WorkerClient(worker, self.rcfg.round_retries, on_retry=self.metrics.retry)
        # Created at application start-up (services/provision.py); a replica only finds them.
        self.depth, records = find_control(self.cfg.depth_control)
        self.control = app.state.depth = DepthClient(
            self.depth,
            self.rcfg.depth_control_timeout_s,
            self.rcfg.tot_grant_wait_s,
            on_decision=self.metrics.decision_latency,
            node_lease=self.cfg.depth_control.node_lease,
        )
        self.records = app.state.records = RecordsClient(records, self.rcfg.depth_control_timeout_s)
        self.kv = store_client(self.cfg)  # the KV shards' client (hints), or None when the store is off
        self.accounting = chat.Accounting(
            self.metrics,
            self.control,
            self.records,
            self.auth,
            self.domains.default_domain,
            on_exit=self.kv.mark_exited if self.kv is not None else (lambda session: None),
        )
        self._orchestrator: Orchestrator | None = None
        self.created = int(time.time())

    async def _orch(self) -> Orchestrator:
        if self._orchestrator is None:
            info = await self.workers.engine_info()
            self._orchestrator = Orchestrator(
                self.workers.generate,
                _no_decide,  # every request brings its own decider (DepthClient.decider)
                self.tokenizer,
                expand=self.workers.expand,
                vocab_size=info["vocab_size"],
                max_model_len=info["max_model_len"],
                min_round_tokens=self.rcfg.min_round_tokens,
                trace=self.trace,
                trace_opened=self.trace is not None and self.tokenizer.opens(self.trace.start),
                answer_reserve=self.rcfg.answer_reserve_tokens,
                prompts=self.prompts,
            )
        return self._orchestrator

    @app.post("/v1/chat/completions", openapi_extra=CHAT_LINKS)
    async def chat_completions(self, req: ChatRequest, request: Request):
        # validate
        chat.check(req, self.model, self.rcfg)
        sampling = chat.sampling(req, self.rcfg)
        # plan
        try:
            asked = chat.plan_request(req, thinks=self.trace is not None)
            planned = self.planner.plan(asked)
        except PlanError as exc:
            raise ApiError(400, str(exc), param=exc.param) from exc
        if (refused := access.check_chat(self.auth, access.caller(request), planned.plan.tier)) is not None:
            return refused  # 403: a tier the key may not use; 429: its tokens per minute are used up
        orch, conversation = await self._orch(), req.conversation()
        try:
            first_prompt = orch.first_prompt(conversation)  # checked here: a 400 before any stream
        except ContextLengthError as exc:
            raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from exc
        rid, key, control = responses.new_id(), access.key_id(request), Control()
        if self.kv is not None and (req.reasoning is None or req.reasoning.kv_store is not False):
            sampling = dataclasses.replace(sampling, kv_tags=(rid, 0, ""))  # the session is the request
        plan = await self._admit(
            rid, key, asked, planned.plan, control, access.limits_of(access.caller(request))
        )
        if isinstance(plan, JSONResponse):
            return plan  # 429: the key is over its own limits, counted across every router
        # run the loop
        grant, release = self.control.nodes(rid, control)
        run = orch.run(
            rid,
            conversation,
            plan,
            sampling,
            first_prompt,
            decide=self.control.decider(control),
            grant_nodes=grant,
            release_nodes=release,
        )
        events = chat.accounted(self.accounting, rid, key, run, control, plan)
        # respond
        meta = responses.Meta(
            rid, self.model, int(time.time()), planned.tier_reason, planned.domain_reason, control
        )
        if plan.review:  # the verified answer is held for a human: 202, released on approval
            body = await responses.complete(events, meta)
            domain = plan.domain or self.domains.default_domain
            review = await self.records.create_review(
                responses.review_id(rid), rid, plan.tier, domain, responses.proposed(body), body
            )
            return JSONResponse(responses.review_view(review), status_code=202)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                responses.sse(events, meta, include_usage), media_type="text/event-stream"
            )
        return JSONResponse(await responses.complete(events, meta))

    async def _admit(self, rid, key, asked, plan, control: Control, limits: dict | None):
        """Admission by depth control: the plan it grants (the domain's live threshold, ceilings
        lowered under pressure, who decides the rounds), or a 429 when the key is over its limits."""
        adm = await self.control.admit(rid, key, plan, control, limits)
        if adm is not None and "refused" in adm:
            return access.cluster_refusal(adm["refused"])
        if adm is None:  # unreachable: the plan's ceilings, with the domain's last granted threshold
            last = self.control.last_threshold(plan.domain)
            return self.planner.admitted(plan, asked, Admission(plan.max_rounds, plan.min_rounds, last))
        admission = Admission.from_dict(adm)
        control.degraded, control.reasons = admission.degraded, list(admission.reasons)
        control.depth_value = adm.get("depth_value")
        return self.planner.admitted(plan, asked, admission)

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
