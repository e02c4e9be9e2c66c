"""Render a Sample into the model's prompt: its chat template when it has one, raw otherwise."""
from __future__ import annotations

from typing import Any

from .schema import Sample


class PromptFormat:
    """Turns samples into prompt text and token ids for one tokenizer.

    With a chat template the user turn holds context + question, the generation prompt opens
    the assistant turn and the answer prefix is appended to it (the model continues it).
    Samples with use_template=False (perplexity) are the raw context.
    """

    def __init__(self, tokenizer: Any, use_chat_template: bool | None = None) -> None:
        self.tokenizer = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.chat = has_template if use_chat_template is None else (use_chat_template and has_template)

    def user_text(self, context: str, question: str) -> str:
        return f"{context}\n\n{question}" if question else context

    def render(self, sample: Sample) -> str:
        return self.render_parts(sample.context, sample.question, sample.answer_prefix, sample.use_template)

    def render_parts(self, context: str, question: str, answer_prefix: str, use_template: bool = True) -> str:
        user = self.user_text(context, question)
        if not use_template:
            return f"{user}\n\n{answer_prefix}" if answer_prefix else user
        if self.chat:
            head = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
            )
            return head + answer_prefix
        return f"{user}\n\nAnswer: {answer_prefix}" if answer_prefix else f"{user}\n\nAnswer:"

    def _special(self, use_template: bool) -> bool:
        # A rendered chat template already carries its BOS text; don't add a second one.
        return not (use_template and self.chat)

    def encode_text(self, text: str, use_template: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=self._special(use_template))["input_ids"])

    def encode(self, sample: Sample) -> list[int]:
        return self.encode_text(self.render(sample), sample.use_template)

    def count(self, sample: Sample) -> int:
        return len(self.encode(sample))
