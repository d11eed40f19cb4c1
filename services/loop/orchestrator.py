"""Runs one request's reasoning loop round by round (no ray/vllm import: engine and depth control
are injected as callables, so the router, the benchmarks and the engine tests share this code).

It yields events: reasoning text, content text, one `RoundDone` per round, then `Finished`. A round
that may end the loop on confidence is held until its verdict, so streamed `reasoning_content` and
`content` match the non-streaming response exactly (see `round_role`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Sequence

from services.loop.closing import close_round, closing_text, needs_closing, round_cap
from services.loop.events import (
    ContentDelta,
    ContextLengthError,
    DecideFn,
    Event,
    ExpandFn,
    Finished,
    GenerateFn,
    GrantFn,
    Outcome,
    ReasoningDelta,
    ReleaseFn,
    RoundDone,
    Tokenizer,
    local_decide,
)
from services.loop.thinking_run import run_thinking
from services.loop.thinking_tot import run_thinking_tot
from services.loop.tot_run import grant_all, release_none, run_tot
from services.reasoning.confidence import round_confidence
from services.reasoning.loop import RoundLoop, RoundRecord, StreamRole, round_role
from services.reasoning.prompts import DEFAULT_PROMPTS, Message, RoundPrompts, round_messages
from services.reasoning.pruning import PruneError, fit_transcript
from services.reasoning.signals import Signals, extract_answer, stable_rounds
from services.reasoning.thinking import REASONING, TraceMarkers, TraceSplitter, split_trace
from services.reasoning.tiers import Reason, RoundPlan, Verdict
from services.worker.engine import Accumulator, GenerateDelta, GenerateResult, SamplingSpec, round_tags

__all__ = [  # the loop's types, importable from here as before
    "ContentDelta",
    "ContextLengthError",
    "DecideFn",
    "Event",
    "ExpandFn",
    "Finished",
    "GenerateFn",
    "GrantFn",
    "Orchestrator",
    "Outcome",
    "ReasoningDelta",
    "ReleaseFn",
    "RoundDone",
    "Tokenizer",
    "local_decide",
]


def round_header(index: int) -> str:
    return f"[round {index}: {'draft' if index == 0 else 'verify'}]\n"


def reasoning_text(records: Sequence[RoundRecord]) -> str:
    return "".join(f"{round_header(r.index)}{r.text}\n\n" for r in records)


class Orchestrator:
    def __init__(
        self,
        generate: GenerateFn,
        decide: DecideFn,
        tokenizer: Tokenizer,
        *,
        vocab_size: int,
        max_model_len: int,
        min_round_tokens: int = 16,
        clock: Callable[[], float] = time.perf_counter,
        expand: ExpandFn | None = None,
        trace: TraceMarkers | None = None,
        trace_opened: bool = False,
        answer_reserve: int = 128,
        prompts: RoundPrompts = DEFAULT_PROMPTS,
    ) -> None:
        self._generate = generate
        self.prompts = prompts  # the served model family's draft and verify instructions
        self._expand = expand
        self._decide = decide
        self._tok = tokenizer
        self._vocab = vocab_size
        self._max_len = max_model_len
        self._min_tokens = min_round_tokens
        self._clock = clock
        # A model that thinks natively: its trace is reasoning, the text after it the answer.
        self._trace, self._trace_opened = trace, trace_opened
        # Thinking mode under max_completion_tokens: tokens kept for the answer when closing the trace.
        self.answer_reserve = answer_reserve
        self._forced: tuple[str, list[int]] | None = None  # the closing's text and tokens, once encoded

    @property
    def trace(self) -> TraceMarkers | None:
        return self._trace

    @property
    def trace_opened(self) -> bool:
        return self._trace_opened

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def now(self) -> float:
        return self._clock()

    def generate(
        self, request_id: str, prompt: list[int], spec: SamplingSpec
    ) -> AsyncIterator[GenerateDelta]:
        return self._generate(request_id, prompt, spec)

    def split(self, text: str) -> tuple[str, str]:
        """(thinking trace, answer) of a round's text; no trace when the model does not think."""
        return split_trace(text, self._trace, self._trace_opened) if self._trace else ("", text)

    def _splitter(self) -> TraceSplitter | None:
        return TraceSplitter(self._trace, self._trace_opened) if self._trace else None

    def render(self, conversation: Sequence[Message], earlier_rounds: Sequence[str]) -> list[int]:
        return self._tok.render(round_messages(conversation, earlier_rounds, self.prompts))

    def fits(self, prompt: list[int]) -> bool:
        return len(prompt) + self._min_tokens <= self._max_len

    def room(self, max_tokens: int, prompt: list[int]) -> int:
        return min(max_tokens, self._max_len - len(prompt))

    def spare(self, prompt: list[int]) -> int:
        """Context left after `prompt` once a round's least room (min_round_tokens) is set aside."""
        return self._max_len - len(prompt) - self._min_tokens

    def prune(
        self, conversation: Sequence[Message], history: Sequence[str], max_tokens: int
    ) -> tuple[list[int] | None, dict | None]:
        """The next prompt cut to fit the context (older rounds condensed, then dropped), counted
        with the real tokenizer; (None, None) when even the question and the latest round do not fit.
        Tries to leave the round its full token cap first, then the least room a round needs."""

        def count(messages: Sequence[Message]) -> int:
            return len(self._tok.render(messages))

        for budget in (self._max_len - max_tokens, self._max_len - self._min_tokens):
            if budget <= 0:
                continue
            try:
                p = fit_transcript(conversation, history, budget, count, self.prompts)
            except PruneError:
                continue
            info = {"tokens": p.tokens, "condensed": list(p.condensed), "dropped": list(p.dropped)}
            return self._tok.render(p.messages), info
        return None, None

    async def expand(
        self, request_id: str, prompt: list[int], spec: SamplingSpec, n: int
    ) -> list[GenerateResult]:
        assert self._expand is not None
        return await self._expand(request_id, prompt, spec, n)

    def first_prompt(self, conversation: Sequence[Message]) -> list[int]:
        """Round 0's prompt; raises ContextLengthError when it leaves no room for an answer."""
        ids = self._tok.render(round_messages(conversation, [], self.prompts))
        if len(ids) + self._min_tokens > self._max_len:
            raise ContextLengthError(len(ids), self._max_len, self._min_tokens)
        return ids

    async def run(
        self,
        request_id: str,
        conversation: Sequence[Message],
        plan: RoundPlan,
        sampling: SamplingSpec,
        first_prompt: list[int] | None = None,
        *,
        decide: DecideFn | None = None,
        grant_nodes: GrantFn | None = None,
        release_nodes: ReleaseFn | None = None,
    ) -> AsyncIterator[Event]:
        """Run the loop; `first_prompt` is round 0's prompt when the caller already checked it.
        `decide` overrides the orchestrator's DecideFn for this request; ToT asks `grant_nodes` before
        every expansion (default: everything wanted is granted)."""
        prompt = first_prompt if first_prompt is not None else self.first_prompt(conversation)
        thinking = self._trace is not None and plan.mode == "thinking"
        if plan.strategy == "tot" and self._expand is None:
            raise ValueError("strategy 'tot' needs an engine that expands n children (expand=)")
        if plan.strategy == "tot" and thinking:  # a tree of segments of one native trace
            grant, release = grant_nodes or grant_all, release_nodes or release_none
            events = run_thinking_tot(
                self, request_id, plan, sampling, prompt, grant, release, decide or self._decide
            )
        elif plan.strategy == "tot":
            events = run_tot(
                self, request_id, conversation, plan, sampling, prompt, grant_nodes, release_nodes, decide
            )
        elif thinking:  # one native trace, in segments
            events = run_thinking(self, request_id, plan, sampling, prompt, decide or self._decide)
        else:
            events = self._chain(request_id, conversation, plan, sampling, prompt, decide or self._decide)
        async for ev in events:
            yield ev

    async def _chain(
        self,
        request_id: str,
        conversation: Sequence[Message],
        plan: RoundPlan,
        sampling: SamplingSpec,
        prompt: list[int],
        decide: DecideFn,
    ) -> AsyncIterator[Event]:
        """The chain of rounds: draft, then verify until depth control (within the guards) says exit."""
        loop = RoundLoop(plan)
        pruned: dict | None = None  # how the coming round's prompt was cut to fit, if it was
        while True:
            index = loop.next_index
            rid = f"{request_id}-r{index}"
            role = round_role(plan, index)
            cap = min(sampling.max_tokens, self._max_len - len(prompt))
            own = self._round_cap(cap, sampling)  # less a closing's reserve, when the round may be closed
            spec = dataclasses.replace(sampling, max_tokens=own, kv_tags=round_tags(sampling, index))
            if role is StreamRole.REASONING:
                yield ReasoningDelta(round_header(index))
            acc, live = Accumulator(), self._splitter() if role is StreamRole.FINAL else None
            start = self._clock()
            async for event in self._stream(self._generate(rid, prompt, spec), acc, role, live, start):
                yield event
            closed = needs_closing(acc, extract_answer("".join(acc.text)), cap, own)
            if closed:
                closing = close_round(self._generate, rid, prompt, acc, self._closing(), cap, spec)
                async for event in self._stream(closing, acc, role, live, start):
                    yield event
            for event in _live_text(role, live, None):
                yield event
            record = self.record(index, acc, prompt, (self._clock() - start) * 1000.0, loop.rounds)
            record.pruned, record.closed = pruned, closed
            verdict, next_prompt, pruned = await self._settle(
                loop, record, conversation, plan, decide, sampling
            )
            if next_prompt is not None:
                prompt = next_prompt
            for event in _settled_text(role, record, self.split(record.text), loop.done):
                yield event
            yield RoundDone(record, verdict)
            if loop.done:
                break
        assert loop.exit_reason is not None
        trace, answer = self.split(loop.final.text)
        yield Finished(
            Outcome(plan, loop.rounds, loop.exit_reason, answer, reasoning_text(loop.earlier) + trace)
        )

    async def _stream(
        self,
        deltas: AsyncIterator[GenerateDelta],
        acc: Accumulator,
        role: StreamRole,
        live: TraceSplitter | None,
        start: float,
    ) -> AsyncIterator[Event]:
        """Gather a round's deltas into `acc`, streaming its text as the round's role allows."""
        async for delta in deltas:
            acc.add(delta, (self._clock() - start) * 1000.0)
            if delta.text and role is not StreamRole.UNDECIDED:
                for event in _live_text(role, live, delta.text):
                    yield event

    def _closing(self) -> tuple[str, list[int]]:
        """The text (and its tokens) written after a round cut before its answer line."""
        text = closing_text(self.prompts)
        if self._forced is None or self._forced[0] != text:  # encoded once per closing text
            self._forced = (text, self._tok.encode(text))
        return self._forced

    def _round_cap(self, cap: int, sampling: SamplingSpec) -> int:
        """A chain round's own cap: `cap` less a closing's reserve where rounds may be closed (never
        for a model that thinks natively: its cut round is mid-trace; never under ignore_eos: the
        client asked for rounds that fill their cap)."""
        if self._trace is not None or not self.prompts.close_tokens or sampling.ignore_eos:
            return cap
        return round_cap(cap, len(self._closing()[1]), self.prompts)

    async def _settle(
        self,
        loop: RoundLoop,
        record: RoundRecord,
        conversation: Sequence[Message],
        plan: RoundPlan,
        decide: DecideFn,
        sampling: SamplingSpec,
    ) -> tuple[Verdict, list[int] | None, dict | None]:
        """Settle a finished round: its verdict, and (unless it was the last) the next prompt and
        how it was pruned to fit. Ends the loop on context_limit when nothing fits."""
        history = [*(r.text for r in loop.rounds), record.text]
        assert record.signals is not None
        asked = asyncio.ensure_future(decide(plan, record.index + 1, record.signals))
        next_prompt: list[int] | None = None
        if not loop.guarded(record.signals):
            # Render the next prompt while the verdict comes (an actor call when the plan asks one).
            next_prompt = self._tok.render(round_messages(conversation, history, self.prompts))
        remote = await asked
        verdict = loop.settle(record, remote)
        if verdict.exit:
            return verdict, None, None
        prompt = next_prompt or self._tok.render(round_messages(conversation, history, self.prompts))
        if self.fits(prompt):
            return verdict, prompt, None
        pruned_prompt, pruned = self.prune(conversation, history, sampling.max_tokens)
        if pruned_prompt is None:
            loop.stop(Reason.CONTEXT)
        return verdict, pruned_prompt, pruned

    def record(
        self,
        index: int,
        acc: Accumulator,
        prompt: list[int],
        latency_ms: float,
        earlier: Sequence[RoundRecord],
        *,
        answers: bool = True,
    ) -> RoundRecord:
        """A finished round's record and signals. `answers`: the round is expected to state a final
        answer (False for a thinking segment), so one that does not is never confident."""
        text = "".join(acc.text)
        confidence = round_confidence(text, acc.token_ids, acc.logprobs, self._vocab, self._tok.decode)
        answer = extract_answer(self.split(text)[1] or text)  # mid-trace: what the trace says so far
        # Entropy confidence over the answer span (as `confidence`); DeepConf signals over the round.
        signals = dataclasses.replace(
            Signals.compute(acc.logprobs, self._vocab),
            entropy_confidence=confidence,
            stable_rounds=stable_rounds([*(r.answer for r in earlier), answer]),
            has_answer=(answer is not None) if answers else None,
        )
        return RoundRecord(
            index=index,
            text=text,
            prompt_tokens=acc.prompt_tokens or len(prompt),
            completion_tokens=len(acc.token_ids),
            cached_tokens=acc.cached_tokens,
            kv_loaded_tokens=acc.kv_loaded_tokens,
            worker=acc.worker,
            confidence=confidence,
            latency_ms=latency_ms,
            ttft_ms=acc.ttft_ms,
            signals=signals,
            answer=answer,
            finish_reason=acc.finish_reason or "stop",
        )


def _live_text(role: StreamRole, live: TraceSplitter | None, text: str | None) -> list[Event]:
    """A delta as it streams: a reasoning round's text is reasoning; the last round's is content, but
    for a thinking model's trace (`live` splits it). `text` None: the round ended (flush)."""
    if role is StreamRole.REASONING:
        return [ReasoningDelta(text)] if text else []
    if live is None:
        return [ContentDelta(text)] if text else []
    parts = live.feed(text) if text is not None else live.flush()
    return [(ReasoningDelta if kind == REASONING else ContentDelta)(t) for kind, t in parts]


def _settled_text(role: StreamRole, record: RoundRecord, split: tuple[str, str], last: bool) -> list[Event]:
    """What to emit once a round's verdict is known, given what was already streamed. `split` is
    the round's (thinking trace, answer); the trace is reasoning."""
    trace, answer = split
    if role is StreamRole.UNDECIDED:
        if last:
            return ([ReasoningDelta(trace)] if trace else []) + [ContentDelta(answer)]
        return [ReasoningDelta(round_header(record.index) + record.text + "\n\n")]
    if role is StreamRole.REASONING:
        # Streamed as reasoning; only a context stop makes such a round the last one.
        return [ReasoningDelta("\n\n")] + ([ContentDelta(answer)] if last else [])
    return []
