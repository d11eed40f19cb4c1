"""Round prompts (pure): round 0 drafts, each later round verifies and restates the final answer.

The transcript only ever grows at its end (user messages, then draft, verify request, verification,
...), so every round's prompt extends the previous one and the engine's prefix cache (and later the
KV store) reuses the earlier rounds instead of recomputing them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DRAFT_INSTRUCTION = (
    "Think step by step. End your reply with a last line of the form 'Final answer: <answer>'."
)
VERIFY_INSTRUCTION = (
    "Check the answer above step by step. If you find a mistake, correct it. "
    "End your reply with a last line of the form 'Final answer: <answer>'."
)


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def round_messages(conversation: Sequence[Message], earlier_rounds: Sequence[str]) -> list[Message]:
    """Chat messages for the next round, given the client's conversation and earlier round texts."""
    msgs = _with_instruction(conversation)
    for text in earlier_rounds:
        msgs.append(Message("assistant", text))
        msgs.append(Message("user", VERIFY_INSTRUCTION))
    return msgs


def _with_instruction(conversation: Sequence[Message]) -> list[Message]:
    # The drafting instruction joins the client's system prompt (or becomes one), so the client's
    # own instructions keep their place and models without a system role still see it first.
    msgs = list(conversation)
    if msgs and msgs[0].role in ("system", "developer"):
        return [Message("system", f"{msgs[0].content}\n\n{DRAFT_INSTRUCTION}"), *msgs[1:]]
    return [Message("system", DRAFT_INSTRUCTION), *msgs]
