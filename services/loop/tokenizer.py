"""The model's own tokenizer and chat template, so token counts and context checks are exact."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from services.reasoning.prompts import Message


class HfTokenizer:
    """Renders chat messages to the exact prompt token ids the engine will see."""

    def __init__(self, model_path: str, chat_template: str | None = None) -> None:
        """`chat_template`: a Jinja file to use instead of the model's own template."""
        from transformers import AutoTokenizer  # heavy: only where a tokenizer is needed

        self._tok = AutoTokenizer.from_pretrained(model_path)
        if chat_template is not None:
            self._tok.chat_template = Path(chat_template).read_text(encoding="utf-8")
        if not getattr(self._tok, "chat_template", None):
            raise ValueError(f"the tokenizer in {model_path} has no chat template")

    def render(self, messages: Sequence[Message]) -> list[int]:
        text = self._tok.apply_chat_template(
            [m.as_dict() for m in messages], add_generation_prompt=True, tokenize=False
        )
        # The template already holds the special tokens; adding more would shift every count.
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Text the router appends to a prompt (a trace's end marker): no special tokens added."""
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    @property
    def chat_template(self) -> str:
        return str(self._tok.chat_template)

    def opens(self, marker: str) -> bool:
        """Whether the template's generation prompt ends with `marker` (it opens the model's trace)."""
        text = self._tok.apply_chat_template(
            [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False
        )
        return text.rstrip().endswith(marker)
