"""Tool calling with the official openai client against a real server on the tiny model:
`required` and named choices are grammar-enforced (arguments validate against the function's
schema, streamed calls reassemble to the same calls); `auto` reads the reply with the
server's --tool-call-parser; tool results in the history reach the prompt. The parsers
(Hermes/Qwen, Llama-3 JSON, Mistral) are checked on text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from pinnace.runtime.server.tool_parsers import TOOL_PARSERS, ParsedToolCall
from pinnace.runtime.server.tools import ToolSettings, plan_tools

MODEL = "tiny"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"tz": {"type": "string", "pattern": "^[A-Z]{3}$"}},
    "required": ["tz"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": n, "description": n, "parameters": s}}
    for n, s in SCHEMAS.items()
]
ASK = [{"role": "user", "content": "What's the weather in Paris and the time in UTC?"}]


@pytest.fixture(scope="module")
def server(start_server: Any, tiny_model: Any) -> Iterator[Any]:
    srv = start_server(tiny_model, max_model_len=512)
    srv.app.state.ctx.tool_settings = ToolSettings(True, "hermes")  # --tool-call-parser hermes
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def check_calls(calls: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for call in calls:
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        assert call.id and call.type == "function"
        out.append((call.function.name, args))
    return out


def test_required_always_returns_calls_that_validate(client: openai.OpenAI) -> None:
    # One call per reply: a random-weight model would not know when to close a list.
    resp = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", n=8, temperature=1.0,
        seed=3, max_tokens=120, parallel_tool_calls=False,
    )  # fmt: skip
    names = set()
    for choice in resp.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls or []) == 1
        names |= {name for name, _ in check_calls(choice.message.tool_calls or [])}
    assert names == set(SCHEMAS)  # both tools get chosen across the samples
    # With parallel calls the grammar allows a list of calls of any length from one.
    parallel = plan_tools(TOOLS, "required", None, ToolSettings()).constraint
    assert parallel is not None and isinstance(parallel.json, dict)
    assert parallel.json["minItems"] == 1 and "maxItems" not in parallel.json


def test_named_function_is_called_with_valid_arguments(client: openai.OpenAI) -> None:
    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    resp = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named, n=4, temperature=1.0,
        max_tokens=60,
    )  # fmt: skip
    for choice in resp.choices:
        ((name, args),) = check_calls(choice.message.tool_calls or [])
        assert name == "get_weather" and args["city"] in ("Paris", "Tokyo", "Lima")


def stream_calls(client: openai.OpenAI, **kwargs: Any) -> list[tuple[str, str]]:
    """Reassemble streamed delta.tool_calls the way OpenAI's docs do: by index."""
    calls: dict[int, dict[str, str]] = {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                if delta.function and delta.function.name:
                    entry["name"] += delta.function.name
                if delta.function and delta.function.arguments:
                    entry["arguments"] += delta.function.arguments
    return [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_time"}}]
)
def test_streamed_tool_calls_reassemble_to_the_same_calls(
    client: openai.OpenAI, choice: Any
) -> None:
    kwargs: dict[str, Any] = dict(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=120,
        parallel_tool_calls=False,
    )  # fmt: skip
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls or []
    expected = [(c.function.name, c.function.arguments) for c in whole]
    streamed = stream_calls(client, **kwargs)
    assert expected and [(n, json.loads(a)) for n, a in streamed] == [
        (n, json.loads(a)) for n, a in expected
    ]


def test_auto_reads_the_reply_with_the_servers_parser(client: openai.OpenAI) -> None:
    # The tiny model's reply is forced into Hermes' format; the parser must find the call.
    form = r'<tool_call>\{"name": "get_time", "arguments": \{"tz": "(UTC|CET)"\}\}</tool_call>'
    resp = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=60,
        extra_body={"structured_outputs": {"regex": form}},
    )  # fmt: skip
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    ((name, args),) = check_calls(choice.message.tool_calls or [])
    assert name == "get_time" and args["tz"] in ("UTC", "CET")
    prose = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=8
    )
    assert prose.choices[0].message.tool_calls in (None, []) and prose.choices[0].message.content


def test_tool_results_in_the_history(client: openai.OpenAI, server: Any) -> None:
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "It is 12:34 UTC."},
    ]  # fmt: skip
    resp = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                          tool_choice="none", max_tokens=5)  # fmt: skip
    assert resp.choices[0].message.content is not None
    with server.client() as http:
        ids = http.post("/tokenize", json={"messages": history}).json()["tokens"]
        prompt = http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert "It is 12:34 UTC." in prompt


def test_tool_errors_are_400s_naming_the_parameter(client: openai.OpenAI, server: Any) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "tool_choice"),
    ]  # fmt: skip
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **kwargs)
        assert param in info.value.message, (kwargs, info.value.message)
    server.app.state.ctx.tool_settings = ToolSettings()  # a server without the flags
    try:
        with pytest.raises(openai.BadRequestError, match="enable-auto-tool-choice"):
            client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=4)
    finally:
        server.app.state.ctx.tool_settings = ToolSettings(True, "hermes")


# -- the parsers on text -------------------------------------------------------------------


def test_hermes_parser() -> None:
    text = ('Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n'
            '</tool_call>\n<tool_call>{"name": "f", "arguments": {}}</tool_call>')  # fmt: skip
    content, calls = TOOL_PARSERS["hermes"](text)
    assert content == "Let me check."
    assert calls == [ParsedToolCall("get_time", '{"tz": "UTC"}'), ParsedToolCall("f", "{}")]
    assert TOOL_PARSERS["hermes"]("<tool_call>{not json</tool_call>") == (
        "<tool_call>{not json</tool_call>",
        [],
    )
    assert TOOL_PARSERS["hermes"]("plain answer") == ("plain answer", [])


def test_llama3_json_parser() -> None:
    text = '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    assert TOOL_PARSERS["llama3_json"](text) == (
        None, [ParsedToolCall("a", '{"x": 1}'), ParsedToolCall("b", "{}")]
    )  # fmt: skip
    assert TOOL_PARSERS["llama3_json"]("The answer is 4.") == ("The answer is 4.", [])
    assert TOOL_PARSERS["llama3_json"]('{"no_name": 1}') == ('{"no_name": 1}', [])


def test_mistral_parser() -> None:
    text = '[TOOL_CALLS][{"name": "a", "arguments": {"q": "x"}}, {"name": "b", "arguments": "{}"}]'
    assert TOOL_PARSERS["mistral"](text) == (
        None, [ParsedToolCall("a", '{"q": "x"}'), ParsedToolCall("b", "{}")]
    )  # fmt: skip
    assert TOOL_PARSERS["mistral"]("[TOOL_CALLS] nonsense") == ("[TOOL_CALLS] nonsense", [])


def test_serve_flags_set_the_tool_settings(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from pinnace.cli.main import build_parser, main
    from pinnace.cli.serve import build_config

    flags = ["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"]
    args = build_parser().parse_args(["serve", str(tmp_path), *flags])
    _, settings = build_config(args)
    assert settings.tools == ToolSettings(True, "llama3_json")
    _, plain = build_config(build_parser().parse_args(["serve", str(tmp_path)]))
    assert plain.tools == ToolSettings()
    assert main(["serve", str(tmp_path), "--enable-auto-tool-choice"]) == 2
    assert "--tool-call-parser" in capsys.readouterr().err


def test_auto_streams_prose_as_it_comes_and_calls_when_done(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(
        model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=12
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(stream=True, **kwargs)
        if c.choices
    ]
    assert whole and "".join(pieces) == whole and sum(1 for p in pieces if p) > 3
    form = r'<tool_call>\{"name": "get_time", "arguments": \{"tz": "CET"\}\}</tool_call>'
    forced = {**kwargs, "max_tokens": 60, "extra_body": {"structured_outputs": {"regex": form}}}
    assert stream_calls(client, **forced) == [("get_time", '{"tz": "CET"}')]


def test_content_prefix_stops_where_a_call_could_begin() -> None:
    hermes = plan_tools(TOOLS, "auto", None, ToolSettings(True, "hermes"))
    assert hermes.content_prefix("Sure, let me") == len("Sure, let me")
    assert hermes.content_prefix("Sure <tool") == len("Sure ")  # may grow into the marker
    assert hermes.content_prefix('Ok <tool_call>{"na') == len("Ok ")
    llama = plan_tools(TOOLS, "auto", None, ToolSettings(True, "llama3_json"))
    assert llama.content_prefix('  {"name"') == 0 and llama.content_prefix("<|py") == 0
    assert llama.content_prefix("The answer") == len("The answer")
    mistral = plan_tools(TOOLS, "auto", None, ToolSettings(True, "mistral"))
    assert mistral.content_prefix("Hi [TOOL_") == len("Hi ")
