"""Native thinking traces (pure): models such as DeepSeek-R1 distills, Qwen3 or gpt-oss write a trace
between markers (`<think>` … `</think>`) before their answer. The trace is reasoning, not content.

Markers are strings (configured, or read from the chat template), never token ids: they are found in
the decoded text, so a tokenizer that splits a marker across tokens, or a stream that splits it
across deltas, changes nothing. Some templates open the trace themselves (the generation prompt ends
with the start marker); then the model's output begins inside the trace.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from services.reasoning.signals import extract_answer
from services.reasoning.tiers import RoundPlan

REASONING, CONTENT = "reasoning", "content"
# Thinking mode. Said when depth control ends a trace the model has not closed, before the end
# marker, so the answer that follows reads as one; and when a model closes its trace before the
# least thinking its tier asks for (s1's budget forcing).
TRANSITION = "\n\nThat is enough thinking; time to give the answer.\n"
KEEP_THINKING = "\nWait, let me check that again. "
# A probe (Dynasor's certaindex probe): the trace so far, closed, then this; the model's next few
# tokens are what it would answer now. Probes never enter the trace; agreeing probes mean a stable answer.
PROBE = "\n\nI now have enough to answer.\n{end}\nFinal answer:"
# A probe that hesitates is no answer (Dynasor drops such probes too).
_HESITATION = ("wait", "hmm", "not sure", "?")


def probe_suffix(markers: TraceMarkers) -> str:
    return PROBE.format(end=markers.end)


def probe_answer(text: str) -> str | None:
    """The answer a probe gave (its first line, normalised), or None when it hesitated or gave none."""
    low = text.lower()
    if any(h in low for h in _HESITATION):
        return None
    return extract_answer("Final answer:" + text)


def max_thinking_tokens(plan: RoundPlan) -> int:
    """The most thinking tokens a plan allows: its segments, or the request's budget if lower."""
    most = plan.max_rounds * plan.segment_tokens
    return most if plan.thinking_budget is None else min(most, plan.thinking_budget)


def min_thinking_tokens(plan: RoundPlan) -> int:
    """The least thinking a plan asks for: its min_rounds segments (never above the most)."""
    return min(plan.min_rounds * plan.segment_tokens, max_thinking_tokens(plan))


class TraceMarkers(BaseModel):
    """Where a model's thinking trace starts and ends in its output."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: str = Field("<think>", min_length=1, max_length=64, description="Opens the trace.")
    end: str = Field("</think>", min_length=1, max_length=64, description="Closes the trace.")


def markers_in_template(template: str | None) -> TraceMarkers | None:
    """The default markers when a chat template uses them (a template that thinks), else None."""
    default = TraceMarkers()
    if template and default.start in template and default.end in template:
        return default
    return None


@dataclass
class TraceSplitter:
    """Splits generated text, fed in pieces as it streams, into trace (reasoning) and answer
    (content). The markers themselves go to neither. A piece that ends with what may be the start
    of a marker is held until the next piece (or `flush`) says whether it is one."""

    markers: TraceMarkers
    inside: bool = False  # True: the prompt opened the trace, the output begins in it
    _held: str = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        buf = self._held + text
        while buf:
            marker = self.markers.end if self.inside else self.markers.start
            kind = REASONING if self.inside else CONTENT
            at = buf.find(marker)
            if at >= 0:
                _put(out, kind, buf[:at])
                buf, self.inside = buf[at + len(marker) :], not self.inside
                continue
            keep = _partial_suffix(buf, marker)
            _put(out, kind, buf[: len(buf) - keep])
            buf = buf[len(buf) - keep :]
            break
        self._held = buf
        return out

    def flush(self) -> list[tuple[str, str]]:
        """The end of the output: what was held is text after all."""
        out: list[tuple[str, str]] = []
        _put(out, REASONING if self.inside else CONTENT, self._held)
        self._held = ""
        return out


def split_trace(text: str, markers: TraceMarkers, inside: bool = False) -> tuple[str, str]:
    """(trace, answer) of a whole output; the same split the streaming splitter makes."""
    s = TraceSplitter(markers, inside)
    parts = s.feed(text) + s.flush()
    return (
        "".join(t for k, t in parts if k == REASONING),
        "".join(t for k, t in parts if k == CONTENT),
    )


def _put(out: list[tuple[str, str]], kind: str, text: str) -> None:
    if text:
        out.append((kind, text))


def _partial_suffix(buf: str, marker: str) -> int:
    """Length of the longest end of `buf` that is a proper beginning of `marker`."""
    for n in range(min(len(marker) - 1, len(buf)), 0, -1):
        if marker.startswith(buf[-n:]):
            return n
    return 0
