"""Tool-call parsers: a model's raw text -> (content, tool calls), one per output format.

    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>   (Hermes, Qwen2.5)
    llama3_json  {"name": ..., "parameters": {...}}; several joined by ";"  (Llama 3.x)
    mistral      [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]       (Mistral)

Text that does not hold a well-formed call stays content: a model that answers in prose
is not an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it


Parser = Callable[[str], tuple[str | None, list[ParsedToolCall]]]


def _call(obj: Any, args_key: str = "arguments") -> ParsedToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_hermes(text: str) -> tuple[str | None, list[ParsedToolCall]]:
    if "<tool_call>" not in text:
        return text, []
    calls = []
    for body in _HERMES.findall(text):
        try:
            call = _call(json.loads(body))
        except json.JSONDecodeError:
            call = None
        if call is None:
            return text, []
        calls.append(call)
    content = text[: text.index("<tool_call>")].strip()
    return content or None, calls


def parse_llama3_json(text: str) -> tuple[str | None, list[ParsedToolCall]]:
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    decoder = json.JSONDecoder()
    calls, pos = [], 0
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            return text, []
        call = _call(obj, "parameters")
        if call is None:
            return text, []
        calls.append(call)
        pos = end
        while pos < len(body) and body[pos] in " \n\t;":
            pos += 1
    return None, calls


def parse_mistral(text: str) -> tuple[str | None, list[ParsedToolCall]]:
    marker = "[TOOL_CALLS]"
    if marker not in text:
        return text, []
    head, _, tail = text.partition(marker)
    try:
        items, _ = json.JSONDecoder().raw_decode(tail.strip())
    except json.JSONDecodeError:
        return text, []
    calls = [_call(item) for item in (items if isinstance(items, list) else [items])]
    if not calls or any(c is None for c in calls):
        return text, []
    return head.strip() or None, [c for c in calls if c is not None]


TOOL_PARSERS: dict[str, Parser] = {
    "hermes": parse_hermes,
    "llama3_json": parse_llama3_json,
    "mistral": parse_mistral,
}
