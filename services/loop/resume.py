"""Resuming a round whose worker died mid-generation (pure: no Ray, no vLLM).

The router streams a round's tokens as they come. When the worker replica dies, the round goes on
from where it stopped: another worker gets the prompt plus the tokens already streamed and the rest
of the token budget. The continuation is a valid one, not necessarily the very tokens the dead
worker would have produced: the tokens it had decoded are now prefilled, and in bf16 a prefill and a
decode of the same tokens can round differently, so even a greedy round may pick another token
after the break (two e2e runs with 24-token rounds matched, which is not asserted:
tests/e2e/test_kv_store.py compares only the rounds no kill touched). What the client has seen is
never taken back, so it sees one answer, not an error.
Limit: a stop string split across the break is not seen as one (vLLM only checks new text).
"""

from __future__ import annotations

import dataclasses

from services.worker.engine import GenerateDelta, SamplingSpec


def resumed(spec: SamplingSpec, prompt: list[int], done: list[int]) -> tuple[list[int], SamplingSpec] | None:
    """The request that continues a round after `done` tokens; None when its budget is spent."""
    left = spec.max_tokens - len(done)
    if left <= 0:
        return None
    return prompt + done, dataclasses.replace(spec, max_tokens=left)


def rebase(delta: GenerateDelta, carried: int) -> GenerateDelta:
    """A resumed request's delta as one of the original round: its prompt also held the `carried`
    tokens generated before the break, which are the round's output, not its prompt."""
    if carried == 0 or not delta.prompt_tokens:
        return delta
    prompt = max(0, delta.prompt_tokens - carried)
    return dataclasses.replace(
        delta,
        prompt_tokens=prompt,
        cached_tokens=min(delta.cached_tokens, prompt),
        kv_loaded_tokens=min(delta.kv_loaded_tokens, prompt),
    )


def budget_spent(prompt_tokens: int) -> GenerateDelta:
    """The final delta of a round whose worker died after its last token but before saying so."""
    return GenerateDelta(
        text="", token_ids=[], logprobs=[], finished=True, finish_reason="length", prompt_tokens=prompt_tokens
    )
