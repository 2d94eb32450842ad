"""One chat-template function for `LLM.chat` and the server's chat, tokenize and KServe
routes: a conversation -> prompt token ids, through the tokenizer's template (or one given)."""

from __future__ import annotations

from typing import Any

import jinja2
from transformers import PreTrainedTokenizerBase

from pinnace.runtime.sampling_params import ParameterError


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids of a conversation; a ParameterError naming `messages` when it is empty, the
    model has no template, or the template rejects it."""
    if not messages:
        raise ParameterError(
            "messages", "messages must not be empty (a conversation needs at least one message)."
        )
    if chat_template is None and tokenizer.chat_template is None:
        raise ParameterError(
            "messages",
            "this model's tokenizer has no chat template; pass chat_template "
            "(or start the server with --chat-template).",
        )
    try:
        text = tokenizer.apply_chat_template(
            messages,
            chat_template=chat_template,
            tools=list(tools) if tools else None,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except (jinja2.TemplateError, ValueError) as exc:
        raise ParameterError(
            "messages", f"the chat template rejected these messages: {exc}"
        ) from exc
    # The template writes BOS and other specials itself: don't add them twice.
    return list(tokenizer.encode(str(text), add_special_tokens=False))
