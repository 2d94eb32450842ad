"""The official openai client against a real server: completions, chat, streaming, errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from pinnace.runtime import LLM, SamplingParams

MODEL = "tiny"
PROMPT = "The capital of France is"
MESSAGES: list[Any] = [{"role": "user", "content": "Hi, who are you?"}]


@pytest.fixture(scope="module")
def server_options() -> dict[str, Any]:
    return {"max_model_len": 256}


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def llm(tiny_model: Path) -> LLM:
    return LLM(str(tiny_model), kv_cache_memory=64 * 2**20, max_model_len=256)


def greedy(llm: LLM, prompt: Any, max_tokens: int = 16) -> Any:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return llm.generate([prompt], params, use_tqdm=False)[0]


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("no-such-model")


def test_completion_greedy_equals_llm_generate(client: openai.OpenAI, llm: LLM) -> None:
    expected = greedy(llm, PROMPT)
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    (choice,) = resp.choices
    assert choice.text == expected.outputs[0].text
    assert choice.finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert resp.usage.completion_tokens == 16
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 16


def test_chat_greedy_equals_llm_chat(client: openai.OpenAI, llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=12)
    expected = llm.chat(MESSAGES, params, use_tqdm=False)[0]
    resp = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=12, temperature=0
    )
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == expected.outputs[0].text
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert resp.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_prompt_forms_and_n(client: openai.OpenAI, llm: LLM) -> None:
    ids = llm.get_tokenizer().encode("Once upon a time")
    texts = [greedy(llm, p, 6).outputs[0].text for p in (PROMPT, ids)]
    resp = client.completions.create(
        model=MODEL, prompt=[PROMPT, "x"], max_tokens=6, temperature=0, n=2
    )
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert resp.choices[0].text == resp.choices[1].text == texts[0]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == texts[1]
    both = client.completions.create(
        model=MODEL, prompt=[ids, ids[:2]], max_tokens=6, temperature=0
    )
    assert both.choices[0].text == texts[1] and len(both.choices) == 2
    assert resp.usage is not None and resp.usage.completion_tokens == 4 * 6


def test_sampled_n2_with_seed_is_reproducible(client: openai.OpenAI) -> None:
    kwargs: Any = dict(model=MODEL, messages=MESSAGES, max_tokens=8, n=2, seed=7)
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.usage is not None and first.usage.completion_tokens == 16


def test_stop_string_and_stop_token(client: openai.OpenAI, llm: LLM) -> None:
    full = greedy(llm, PROMPT, 16).outputs[0]
    stop = full.text[len(full.text) // 2 :][:3]
    assert stop.strip(), "pick a stop string with visible characters"
    resp = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop]
    )
    choice = resp.choices[0]
    assert choice.text == full.text[: full.text.index(stop)]
    assert choice.finish_reason == "stop"
    assert choice.model_extra and choice.model_extra["stop_reason"] == stop
    stop_id = full.token_ids[3]
    resp = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=16,
        temperature=0,
        extra_body={"stop_token_ids": [stop_id]},
    )
    assert resp.usage is not None
    assert resp.usage.completion_tokens == full.token_ids.index(stop_id) + 1
    assert resp.choices[0].finish_reason == "stop"


def test_completion_logprobs(client: openai.OpenAI) -> None:
    resp = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3
    )
    lp = resp.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == resp.choices[0].text
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 3 <= len(top) <= 4
        assert logprob <= 0 and logprob == pytest.approx(max(top.values()))  # greedy


def test_chat_logprobs(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = resp.choices[0].logprobs and resp.choices[0].logprobs.content
    assert content and len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.bytes == list(entry.token.encode())


def test_chat_stream_sync(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and all(f is None for f in finals[:-1])
    assert not chunks[-1].choices and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 10


def test_completion_stream_async(server: Any) -> None:
    async def run() -> tuple[dict[int, str], str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        kwargs: Any = dict(model=MODEL, prompt=[PROMPT, "Hello"], max_tokens=8, temperature=0)
        whole = await aclient.completions.create(**kwargs)
        texts: dict[int, str] = {}
        async for chunk in await aclient.completions.create(**kwargs, stream=True):
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
        await aclient.close()
        return texts, "|".join(c.text for c in whole.choices)

    texts, whole = asyncio.run(run())
    assert "|".join(texts[i] for i in sorted(texts)) == whole


def test_raw_sse_framing(server: Any) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert '"role":"assistant"' in events[0]


def test_echo_and_max_completion_tokens(client: openai.OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, echo=True)
    assert resp.choices[0].text.startswith(PROMPT)
    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=2, user="someone"
    )
    assert chat.usage is not None and chat.usage.completion_tokens == 2


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"n": 0}, "n"),
        ({"max_tokens": 10_000}, "max_tokens"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"logit_bias": {"forty-two": 1.0}}, "logit_bias"),
        ({"logit_bias": {"999999": 1.0}}, "logit_bias"),
        ({"n": 2, "best_of": 1}, "best_of"),
        ({"best_of": 3, "stream": True}, "best_of"),
        ({"suffix": "tail"}, "suffix"),
        ({"extra_body": {"no_such_option": 1}}, "no_such_option"),
    ],
)
def test_completion_bad_parameters(client: openai.OpenAI, kwargs: Any, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=PROMPT, **kwargs)
    assert param in info.value.message
    assert info.value.status_code == 400


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        # Without --enable-auto-tool-choice, tools default to tool_choice "auto": refused.
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "enable-auto-tool-choice"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format",
        ),
        ({"extra_body": {"structured_outputs": {"regex": "[a-"}}}, "structured_outputs"),
        (
            {"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}},
            "structured_outputs",
        ),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 50}, "logprobs"),
    ],
)
def test_chat_bad_parameters(client: openai.OpenAI, kwargs: Any, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, **kwargs)
    assert param in info.value.message


def test_unknown_model_and_empty_messages(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="`gpt-4` does not exist"):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="messages must not be empty"):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError, match="only 'text' parts"):
        client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ],
        )


def test_tokenize_detokenize_health_version(server: Any, llm: LLM) -> None:
    with server.client() as http:
        tok = http.post("/tokenize", json={"prompt": PROMPT}).json()
        assert tok["tokens"] == llm.get_tokenizer().encode(PROMPT)
        assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 256
        text = http.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"]
        assert text == PROMPT
        chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
        assert chat["tokens"] == llm.apply_chat_template(MESSAGES)
        bad = http.post("/detokenize", json={"tokens": [-1]})
        assert bad.status_code == 400 and "out of vocabulary" in bad.json()["error"]["message"]
        assert http.get("/health").status_code == 200
        assert http.get("/version").json()["version"]


MULTIBYTE = "Grüße 👋🏽 from 東京: naïve café 🍣"


def _stream(http: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The streamed chunks of `body`; each event's bytes are its model's own dump (what the
    chunk envelope of sse_chunks.py must reproduce)."""
    from pinnace.runtime.server.openai_protocol import ChatCompletionChunk, CompletionResponse

    model = ChatCompletionChunk if "chat" in path else CompletionResponse
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", path, json=streamed) as r:
        payloads = [line[6:] for line in r.iter_lines() if line.startswith("data: {")]
    for payload in payloads:
        assert model.model_validate_json(payload).model_dump_json(exclude_none=True) == payload
    return [json.loads(p) for p in payloads]


def _straddling_stop(text: str, offsets: list[int]) -> str:
    """Two characters across a token boundary, first found there."""
    for k in offsets[1:]:
        stop = text[k - 1 : k + 1]
        if 0 < k < len(text) and stop.strip() and text.find(stop) == k - 1:
            return stop
    raise AssertionError(f"no token boundary to stop at in {text!r}")


def test_streamed_chunks_reassemble_to_the_whole_response(server: Any) -> None:
    """Completions and chat, n=2 over a multibyte prompt with logprobs, stopped by a string
    across a token boundary (completions: in the output or not): per choice the chunks add
    up to the non-streamed response, and each chunk is its model's own bytes."""
    base: dict[str, Any] = dict(model=MODEL, prompt=MULTIBYTE, max_tokens=10, temperature=0,
                                logprobs=2)  # fmt: skip
    with server.client() as http:
        probe = http.post("/v1/completions", json=base).json()["choices"][0]
        stop = _straddling_stop(probe["text"], probe["logprobs"]["text_offset"])
        for include in (False, True):
            body = {**base, "n": 2, "stop": [stop], "include_stop_str_in_output": include}
            whole = http.post("/v1/completions", json=body).json()
            events = _stream(http, "/v1/completions", body)
            assert events[-1]["usage"] == whole["usage"] and not events[-1]["choices"]
            for choice in whole["choices"]:
                assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
                assert choice["text"].endswith(stop) == include
                parts = [c for e in events for c in e["choices"] if c["index"] == choice["index"]]
                assert "".join(p["text"] for p in parts) == choice["text"]
                assert parts[-1]["finish_reason"] == "stop" and parts[-1]["stop_reason"] == stop
                # Not text_offset: streamed, it counts the text sent so far, as vLLM's does
                # (a stop string's held-back characters, an unfinished UTF-8 character).
                for key in ("tokens", "token_logprobs", "top_logprobs"):
                    streamed = [x for p in parts for x in p["logprobs"][key]]
                    assert streamed == choice["logprobs"][key], key

        messages = [{"role": "user", "content": MULTIBYTE}]
        chat: dict[str, Any] = dict(model=MODEL, messages=messages, max_tokens=10,
                                    temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
        probe = http.post("/v1/chat/completions", json=chat).json()["choices"][0]
        tokens = [entry["token"] for entry in probe["logprobs"]["content"]]
        offsets = [sum(map(len, tokens[:i])) for i in range(len(tokens))]
        stop = _straddling_stop(probe["message"]["content"], offsets)
        body = {**chat, "n": 2, "stop": [stop]}
        whole = http.post("/v1/chat/completions", json=body).json()
        events = _stream(http, "/v1/chat/completions", body)
        assert events[-1]["usage"] == whole["usage"] and not events[-1]["choices"]
        for choice in whole["choices"]:
            assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
            parts = [c for e in events for c in e["choices"] if c["index"] == choice["index"]]
            assert parts[0]["delta"] == {"role": "assistant", "content": ""}
            content = "".join(p["delta"].get("content", "") for p in parts)
            assert content == choice["message"]["content"]
            assert parts[-1]["finish_reason"] == "stop" and parts[-1]["stop_reason"] == stop
            entries = [x for p in parts if "logprobs" in p for x in p["logprobs"]["content"]]
            assert entries == choice["logprobs"]["content"]
