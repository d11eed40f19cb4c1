"""The router: Ray Serve FastAPI ingress speaking OpenAI's chat API, running the reasoning loop.

Shell only: validation shapes live in `services.api`, the loop in `services.orchestrator`, response
formatting in `services.responses`; this file wires them to Serve handles and the depth-control actor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from services import responses
from services.api import ApiError, ChatRequest, ReasoningOptions, install_error_handlers
from services.config import AppConfig
from services.depth_control import get_or_create
from services.engine import GenerateDelta, SamplingSpec
from services.orchestrator import ContextLengthError, Orchestrator
from services.reasoning.complexity import ComplexityConfig, pick_tier
from services.reasoning.tiers import (
    Action,
    PlanError,
    Reason,
    RoundPlan,
    TierTable,
    Verdict,
    make_plan,
)
from services.tokenizer import HfTokenizer
from services.worker import delta_from_dict

log = logging.getLogger("ponder.router")

app = FastAPI(title="Ponder", version="0.1.0", description="Multi-round reasoning, OpenAI-compatible")
install_error_handlers(app)


@app.middleware("http")
async def _limit_body(request: Request, call_next):
    # Refuse oversized bodies before reading them; the limit comes from the router's config.
    limit = getattr(app.state, "max_body_bytes", 1 << 20)
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        return ApiError(413, f"Request body larger than {limit} bytes.").response()
    return await call_next(request)


@serve.deployment(name="Router")
@serve.ingress(app)
class Router:
    def __init__(self, config: dict, worker: DeploymentHandle) -> None:
        self.cfg = AppConfig.model_validate(config)
        self.rcfg = self.cfg.router
        app.state.max_body_bytes = self.rcfg.max_body_bytes
        self.worker = worker
        self.model = self.cfg.engine.model
        self.tiers = TierTable.load(self.cfg.depth_control.tiers_file)
        self.complexity = ComplexityConfig.load(self.rcfg.complexity_file)
        self.tokenizer = HfTokenizer(self.cfg.engine.model_path or "")
        self.depth = get_or_create(self.cfg.depth_control)
        self._orchestrator: Orchestrator | None = None
        self.created = int(time.time())

    async def _orch(self) -> Orchestrator:
        if self._orchestrator is None:
            info = await self.worker.engine_info.remote()
            self._orchestrator = Orchestrator(
                self._generate,
                self._decide,
                self.tokenizer,
                vocab_size=info["vocab_size"],
                max_model_len=info["max_model_len"],
                min_round_tokens=self.rcfg.min_round_tokens,
            )
        return self._orchestrator

    async def _generate(
        self, request_id: str, prompt: list[int], spec: SamplingSpec
    ) -> AsyncIterator[GenerateDelta]:
        stream = self.worker.options(stream=True).generate_stream.remote(request_id, prompt, spec.__dict__)
        async for d in stream:
            yield delta_from_dict(d)

    async def _decide(self, plan: RoundPlan, rounds_done: int, conf: float | None) -> Verdict | None:
        """Ask depth control; None (decide locally) when it does not answer in time."""
        try:
            ref = self.depth.decide.remote(plan.__dict__, rounds_done, conf)
            action, reason = await asyncio.wait_for(ref, self.rcfg.depth_control_timeout_s)
            return Verdict(Action(action), Reason(reason))
        except Exception as exc:  # unreachable, restarting or timed out: local ceilings hold
            log.warning("depth control unavailable (%s); deciding locally", type(exc).__name__)
            return None

    def _plan(self, req: ChatRequest) -> tuple[RoundPlan, str]:
        """The request's plan and why its tier: named by the request, or scored from its prompt."""
        r = req.reasoning or ReasoningOptions()
        user_text = "\n".join(m.text() for m in req.messages if m.role == "user")
        tier, tier_reason = pick_tier(r.tier, user_text, self.complexity)
        try:
            plan = make_plan(
                self.tiers,
                tier,
                max_rounds=r.max_rounds,
                min_rounds=r.min_rounds,
                confidence_threshold=r.confidence_threshold,
            )
        except PlanError as exc:
            raise ApiError(400, str(exc), param=exc.param) from exc
        return plan, tier_reason

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
    async def chat_completions(self, req: ChatRequest):
        self._validate(req)
        (plan, tier_reason), sampling = self._plan(req), self._sampling(req)
        orch = await self._orch()
        conversation = req.conversation()
        try:
            first_prompt = orch.first_prompt(conversation)  # checked here: a 400 before any stream
        except ContextLengthError as exc:
            raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from exc
        rid = responses.new_id()
        events = orch.run(rid, conversation, plan, sampling, first_prompt)
        meta = responses.Meta(rid, self.model, int(time.time()), tier_reason)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                responses.sse(events, meta, include_usage), media_type="text/event-stream"
            )
        return JSONResponse(await responses.complete(events, meta))

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
