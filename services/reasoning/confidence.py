"""Confidence of a round from its per-token top-k logprobs (pure).

Normalised entropy, as in the source document: confidence = 1 - H(p) / log(V), with H the Shannon
entropy of the next-token distribution and V the vocabulary size (log V is the entropy of the uniform
distribution, so the score lies in [0, 1]).

The engine returns only the top-k probabilities, so the distribution is incomplete. The mass outside
the top-k, m = 1 - sum(top-k), is real and must count: dropping it would make a flat distribution
look confident. We spread m uniformly over the V - k remaining tokens, which gives the tail its
*maximum* possible entropy, -m * log(m / (V - k)). The resulting H is an upper bound on the true
entropy, so the confidence is a lower bound: this estimate never overstates confidence, which is the
safe direction for an early-exit signal.

A round's confidence is the mean over its answer tokens: the tokens from the last "Final answer:"
marker on when the round has one (the restated answer is what early exit trusts), else all tokens.
A token with no top-k at all (`FORCED`: text the router wrote, such as a closing's marker) was not
sampled and says nothing about the model's confidence: it is left out of every mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

ANSWER_MARKER = "final answer:"
TopLogprobs = Sequence[tuple[int, float]]
FORCED: tuple[tuple[int, float], ...] = ()  # the top-k of a token the router wrote, not the model


def sampled(logprobs: Sequence[TopLogprobs]) -> list[TopLogprobs]:
    """The top-k of the tokens the model sampled (the router's own tokens left out)."""
    return [t for t in logprobs if t]


def token_confidence(top: TopLogprobs, vocab_size: int) -> float:
    """1 - normalised entropy of one token's distribution, tail outside the top-k included."""
    if vocab_size < 2:
        raise ValueError("vocab_size must be at least 2")
    probs = {tid: math.exp(lp) for tid, lp in top}  # a dict: the sampled token may repeat a top-k one
    entropy = -sum(p * math.log(p) for p in probs.values() if p > 0.0)
    tail = 1.0 - sum(probs.values())
    rest = vocab_size - len(probs)
    if tail > 1e-12 and rest > 0:
        entropy -= tail * math.log(tail / rest)
    return min(1.0, max(0.0, 1.0 - entropy / math.log(vocab_size)))


def mean_confidence(logprobs: Sequence[TopLogprobs], vocab_size: int) -> float | None:
    scored = sampled(logprobs)
    if not scored:
        return None
    return sum(token_confidence(t, vocab_size) for t in scored) / len(scored)


def answer_start(text: str, token_ids: Sequence[int], decode: Callable[[list[int]], str]) -> int:
    """Index of the first token of the answer span: the token where the last marker begins, else 0.

    `decode` turns a token-id prefix into text; decoded prefix lengths grow with the prefix, so a
    binary search needs only ~log2(n) decodes.
    """
    pos = text.lower().rfind(ANSWER_MARKER)
    if pos <= 0:
        return 0
    lo, hi = 0, len(token_ids)
    while lo < hi:  # smallest i with len(decode(ids[:i+1])) > pos: the token covering char `pos`
        mid = (lo + hi) // 2
        if len(decode(list(token_ids[: mid + 1]))) > pos:
            hi = mid
        else:
            lo = mid + 1
    return min(lo, max(len(token_ids) - 1, 0))


def round_confidence(
    text: str,
    token_ids: Sequence[int],
    logprobs: Sequence[TopLogprobs],
    vocab_size: int,
    decode: Callable[[list[int]], str],
) -> float | None:
    """Mean token confidence over the round's answer span (see the module docstring)."""
    start = answer_start(text, token_ids, decode)
    return mean_confidence(logprobs[start:], vocab_size)
