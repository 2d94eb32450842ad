"""Tool calling for /v1/chat/completions: what `tools` + `tool_choice` ask of a request.

    none      tools are not shown to the model; the reply is content
    auto      tools go to the chat template; the server's --tool-call-parser reads the reply
    required  a grammar forces a JSON array of {"name", "parameters"} calls of the given tools
    named     a grammar forces the named function's arguments object

`required` and named calls are enforced by the grammar, so their arguments always parse and
match the function's JSON schema.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from pinnace.runtime.sampling_params import StructuredOutputsParams
from pinnace.runtime.server.errors import bad_request
from pinnace.runtime.server.tool_parsers import TOOL_PARSERS, ParsedToolCall, Parser

EMPTY_OBJECT: dict[str, Any] = {"type": "object", "properties": {}}
# Where each parser's calls begin: a streamed auto reply is sent as content up to these.
CALL_MARKERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}
PYTHON_TAG = "<|python_tag|>"  # llama3_json: a call is the whole reply, JSON or this tag


@dataclass
class ToolSettings:
    """The server's flags (vLLM's): --enable-auto-tool-choice, --tool-call-parser."""

    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None

    def __post_init__(self) -> None:
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSERS:
            raise ValueError(
                f"unknown tool call parser {self.tool_call_parser!r}; "
                f"known: {', '.join(sorted(TOOL_PARSERS))}."
            )
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser.")


@dataclass
class ToolPlan:
    mode: str  # "none", "auto", "required" or "named"
    template_tools: list[dict[str, Any]] | None = None  # what the chat template is given
    constraint: StructuredOutputsParams | None = None
    parser: Parser | None = None
    parser_name: str | None = None
    named: str | None = None
    parallel: bool = True
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def uses_tools(self) -> bool:
        return self.mode != "none"

    def content_prefix(self, text: str) -> int:
        """How much of a running auto reply is content for sure: no call can start in it,
        so it may be streamed before the reply is finished."""
        marker = CALL_MARKERS.get(self.parser_name or "")
        if marker is None:  # llama3_json: the reply is a call or it is not
            head = text.lstrip()
            if not head or head.startswith("{") or PYTHON_TAG.startswith(head[: len(PYTHON_TAG)]):
                return 0
            return len(text)
        found = text.find(marker)
        if found >= 0:
            return found
        # Hold back an ending that may grow into the marker.
        for k in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:k]):
                return len(text) - k
        return len(text)

    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """(content, calls) of a finished reply."""
        if self.mode == "named" and self.named is not None:
            return None, [_normalized(self.named, text)]
        if self.mode == "required":
            try:
                items = json.loads(text)
                calls = [_normalized(i["name"], json.dumps(i["parameters"])) for i in items]
            except (json.JSONDecodeError, KeyError, TypeError):
                return text, []  # cut short by max_tokens: not a call
            return None, calls
        if self.mode == "auto" and self.parser is not None:
            content, calls = self.parser(text)
            return content, calls if self.parallel else calls[:1]
        return text, []


def _normalized(name: str, arguments: str) -> ParsedToolCall:
    # Cut short by max_tokens, it is returned as generated.
    with contextlib.suppress(json.JSONDecodeError):
        arguments = json.dumps(json.loads(arguments), ensure_ascii=False)
    return ParsedToolCall(name, arguments)


def new_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Function name -> its parameters schema; 400 for a malformed tool."""
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function")
        if tool.get("type") != "function" or not isinstance(fn, dict):
            raise bad_request(f"tools[{i}] must be of type 'function' with a 'function'.", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request(f"tools[{i}].function needs a name.", "tools")
        params = fn.get("parameters") or EMPTY_OBJECT
        if not isinstance(params, dict):
            raise bad_request(f"tools[{i}].function.parameters must be an object.", "tools")
        out[name] = params
    return out


def plan_tools(
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    parallel_tool_calls: bool | None,
    settings: ToolSettings,
) -> ToolPlan:
    if not tools:
        if tool_choice not in (None, "none"):
            raise bad_request("tool_choice needs tools.", "tool_choice")
        return ToolPlan("none")
    schemas = _functions(tools)
    parallel = parallel_tool_calls is not False
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan("none")
    if choice == "auto":
        if not settings.enable_auto_tool_choice or settings.tool_call_parser is None:
            raise bad_request(
                '"auto" tool choice requires the server to run with --enable-auto-tool-choice '
                "and --tool-call-parser.",
                "tool_choice",
            )
        parser = TOOL_PARSERS[settings.tool_call_parser]
        return ToolPlan(
            "auto", tools, parser=parser, parser_name=settings.tool_call_parser,
            parallel=parallel, schemas=schemas,
        )  # fmt: skip
    if choice == "required":
        return ToolPlan(
            "required", tools, _required_constraint(schemas, parallel), parallel=parallel,
            schemas=schemas,
        )  # fmt: skip
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise bad_request(
                'a named tool_choice is {"type": "function", "function": {"name": ...}}.',
                "tool_choice",
            )
        if name not in schemas:
            raise bad_request(f"tool_choice names {name!r}, which is not in tools.", "tool_choice")
        constraint = StructuredOutputsParams(json=schemas[name])
        return ToolPlan("named", tools, constraint, named=name, schemas=schemas)
    raise bad_request(
        f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r}.",
        "tool_choice",
    )


def _required_constraint(
    schemas: dict[str, dict[str, Any]], parallel: bool
) -> StructuredOutputsParams:
    """A JSON array of calls (one, without parallel calls), each naming a tool and giving
    arguments that match that tool's schema."""
    items = [
        {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [name]}, "parameters": params},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for name, params in schemas.items()
    ]
    array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not parallel:
        array["maxItems"] = 1
    return StructuredOutputsParams(json=array)
