"""Closing a chain round that ran out of tokens before it stated its answer.

A round cut at its token cap with no "Final answer:" line has no answer depth control can read, so
it can never be confident and always costs a verification round. Measured with Qwen2.5-Coder-0.5B at
96 tokens a round, many first rounds ended that way (docs/benchmarks.md, issue 17). Such a round is
closed: the router writes a new line and the family's `close` text ("Final answer:") after it, and
the model completes that one line (greedy, a few tokens, the round's prefix cached, never stored in
the KV store). It is Dynasor's probe made part of the round, where thinking mode keeps its probes out.

The closing comes out of the round's own cap: a round that may be closed generates `cap - reserve`
tokens, so `max_tokens` still bounds the round, closing included. The router's tokens carry no
logprobs (`FORCED`), so confidence is read from what the model wrote after them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable

from services.reasoning.confidence import FORCED
from services.reasoning.prompts import RoundPrompts
from services.worker.engine import Accumulator, GenerateDelta, SamplingSpec

GenerateFn = Callable[[str, list[int], SamplingSpec], AsyncIterator[GenerateDelta]]


def closing_text(prompts: RoundPrompts) -> str:
    return "\n" + prompts.close


def round_cap(cap: int, forced: int, prompts: RoundPrompts) -> int:
    """The tokens a round may generate before a closing: its cap less the closing's reserve, or the
    whole cap (no closing) when the reserve would take more than half of it."""
    reserve = forced + prompts.close_tokens
    return cap - reserve if prompts.close_tokens and cap >= 2 * reserve else cap


def needs_closing(acc: Accumulator, answer: str | None, cap: int, round_cap_: int) -> bool:
    """A round cut at its (reduced) cap with no answer line is closed."""
    return round_cap_ < cap and acc.finish_reason == "length" and answer is None


async def close_round(
    generate: GenerateFn,
    request_id: str,
    prompt: list[int],
    acc: Accumulator,
    forced: tuple[str, list[int]],
    cap: int,
    round_spec: SamplingSpec,
) -> AsyncIterator[GenerateDelta]:
    """The closing's deltas: the router's text first, then the model's line after it. Only text,
    tokens, logprobs and finish reason: the round keeps its own prompt, cache and worker figures."""
    text, ids = forced
    closing_prompt = [*prompt, *acc.token_ids, *ids]  # before `acc` takes the router's tokens
    spec = SamplingSpec(
        max_tokens=max(1, cap - len(acc.token_ids) - len(ids)),
        temperature=0.0,  # the model's most likely answer now
        stop=("\n",),  # one line: the answer
        top_logprobs=round_spec.top_logprobs,  # its confidence is read as the round's
        kv_tags=None,  # never extended: not worth a place in the KV store
        affinity=round_spec.session,  # the worker whose prefix cache holds the round
    )
    yield GenerateDelta(text, list(ids), [FORCED] * len(ids))
    async for d in generate(f"{request_id}-close", closing_prompt, spec):
        yield dataclasses.replace(d, prompt_tokens=0, cached_tokens=0, kv_loaded_tokens=0, worker="")
