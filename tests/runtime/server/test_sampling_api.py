"""The sampler's processors reach it from every API: OpenAI completions and chat, and KServe
V2 `parameters` (tiny model, real server)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

MODEL = "tiny"
PROMPT = "The capital of France is"


def token_id(http: httpx.Client, text: str) -> int:
    (tid,) = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()[
        "tokens"
    ]
    return int(tid)


def detokenize(http: httpx.Client, ids: list[int]) -> str:
    return str(http.post("/detokenize", json={"tokens": ids}).json()["prompt"])


def completion(http: httpx.Client, **body: Any) -> dict[str, Any]:
    base = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    resp = http.post("/v1/completions", json={**base, **body})
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def test_openai_logit_bias_allowed_tokens_and_bad_words(http: httpx.Client) -> None:
    yes = token_id(http, " yes")
    assert completion(http, logit_bias={str(yes): 100})["choices"][0]["text"] == detokenize(
        http, [yes] * 4
    )
    only = completion(http, allowed_token_ids=[yes])["choices"][0]["text"]
    assert only == detokenize(http, [yes] * 4)
    greedy = completion(http, logprobs=0)["choices"][0]
    first = greedy["logprobs"]["tokens"][0]
    banned = completion(http, bad_words=[first], logprobs=0)["choices"][0]
    assert banned["logprobs"]["tokens"][0] != first
    # Between two allowed tokens greedy repeats one; penalties make it alternate.
    no = token_id(http, " no")
    two = {"max_tokens": 8, "allowed_token_ids": [yes, no], "logprobs": 0}
    plain = completion(http, **two)["choices"][0]["logprobs"]["tokens"]
    assert len(set(plain)) == 1
    penalized = completion(http, presence_penalty=2.0, frequency_penalty=2.0, **two)
    assert set(penalized["choices"][0]["logprobs"]["tokens"]) == {" yes", " no"}
    chat = http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
              "temperature": 0, "ignore_eos": True, "logit_bias": {str(yes): 100}},
    )  # fmt: skip
    assert chat.json()["choices"][0]["message"]["content"] == detokenize(http, [yes] * 3)


def test_kserve_v2_parameters_reach_the_sampler(http: httpx.Client) -> None:
    yes = token_id(http, " yes")
    tensor = {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [PROMPT]}
    params = {"temperature": 0, "max_tokens": 3, "ignore_eos": True, "allowed_token_ids": [yes],
              "apply_chat_template": False}  # fmt: skip
    resp = http.post(f"/v2/models/{MODEL}/infer", json={"inputs": [tensor], "parameters": params})
    assert resp.status_code == 200, resp.text
    assert resp.json()["outputs"][0]["data"][0] == detokenize(http, [yes] * 3)
    params = {"max_tokens": 3, "logit_bias": {"99999999": 1.0}}
    resp = http.post(f"/v2/models/{MODEL}/infer", json={"inputs": [tensor], "parameters": params})
    assert resp.status_code == 400 and "logit_bias" in resp.text


def test_use_beam_search_equals_llm_beam_search(http: httpx.Client, tiny_model: Any) -> None:
    from pinnace.runtime import LLM
    from pinnace.runtime.beam_search import BeamSearchParams

    body = {"n": 3, "max_tokens": 5, "use_beam_search": True, "length_penalty": 0.5}
    resp = completion(http, **body)
    llm = LLM(str(tiny_model), kv_cache_memory=16 * 2**20)
    params = BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True, length_penalty=0.5)
    (expected,) = llm.beam_search([PROMPT], params)
    assert [c["text"] for c in resp["choices"]] == [s.text for s in expected.sequences]
    assert [c["index"] for c in resp["choices"]] == [0, 1, 2]
    assert resp["usage"]["completion_tokens"] == 15
    refused = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "stream": True,
                                                 "use_beam_search": True})  # fmt: skip
    assert refused.status_code == 400 and "use_beam_search" in refused.text
    # n is the beam width: 11 beams need 22 logprobs a step, past max_logprobs=20; the 400
    # names n (what the user sent), not logprobs (which they did not).
    body = {"model": MODEL, "prompt": PROMPT, "n": 11, "max_tokens": 2, "use_beam_search": True}
    wide = http.post("/v1/completions", json=body)
    assert wide.status_code == 400 and wide.json()["error"]["param"] == "n", wide.text
    assert "n <= 10" in wide.json()["error"]["message"]


def test_openai_prompt_logprobs_match_transformers(http: httpx.Client, tiny_model: Any) -> None:
    """vLLM's `choices[i].prompt_logprobs`: None, then {token_id: Logprob} per prompt token,
    equal to a transformers forward over the prompt; in the first chunk when streamed."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    body = completion(http, prompt=ids, prompt_logprobs=2, n=2)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    for choice in body["choices"]:
        entries = choice["prompt_logprobs"]
        assert len(entries) == len(ids) and entries[0] is None
        for pos, entry in enumerate(entries[1:]):
            top = ref[pos].topk(2).indices.tolist()
            assert {int(t) for t in entry} == {ids[pos + 1], *top}
            for tid, item in entry.items():
                assert abs(item["logprob"] - float(ref[pos, int(tid)])) < 1e-4
                assert item["decoded_token"] == detokenize(http, [int(tid)])
            assert [entry[str(t)]["rank"] for t in top] == [1, 2]
            # The prompt token's rank, in or outside the top 2: 1 + tokens more likely.
            target = float(ref[pos, ids[pos + 1]])
            lo, hi = (1 + int((ref[pos] > target + d).sum()) for d in (1e-4, -1e-4))
            assert lo <= entry[str(ids[pos + 1])]["rank"] <= hi
    assert completion(http)["choices"][0]["prompt_logprobs"] is None
    stream = http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": ids, "max_tokens": 3, "stream": True, "prompt_logprobs": 0},
    )
    chunks = [
        json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")
    ]
    firsts = [c["choices"][0].get("prompt_logprobs") for c in chunks]
    assert firsts[0][0] is None and len(firsts[0]) == len(ids)
    for pos, entry in enumerate(firsts[0][1:]):  # k = 0: only the prompt token itself
        assert list(entry) == [str(ids[pos + 1])]
        assert abs(entry[str(ids[pos + 1])]["logprob"] - float(ref[pos, ids[pos + 1]])) < 1e-4
    assert all(f is None for f in firsts[1:])


def test_openai_prompt_logprobs_above_max_logprobs_is_a_400(http: httpx.Client) -> None:
    base = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    resp = http.post("/v1/completions", json={**base, "prompt_logprobs": 21})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "prompt_logprobs" and "max_logprobs" in error["message"]
    resp = http.post("/v1/completions", json={**base, "prompt_logprobs": -1})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt_logprobs"


def test_chat_prompt_logprobs_cover_the_templated_prompt(http: httpx.Client) -> None:
    """vLLM's chat response carries prompt_logprobs beside the choices: one entry per token
    of the templated prompt, each holding that token and as many others as asked for."""
    messages = [{"role": "user", "content": "Name a color."}]
    base = {"model": MODEL, "messages": messages, "max_tokens": 2}
    body = http.post("/v1/chat/completions", json={**base, "prompt_logprobs": 1}).json()
    entries = body["prompt_logprobs"]
    assert len(entries) == body["usage"]["prompt_tokens"] and entries[0] is None
    assert all(1 <= len(entry) <= 2 for entry in entries[1:])
    assert all(e["logprob"] <= 0 for entry in entries[1:] for e in entry.values())
    ranked = [e for entry in entries[1:] for e in entry.values() if e["rank"] == 1]
    assert len(ranked) == len(entries) - 1  # each position names its top token
    plain = http.post("/v1/chat/completions", json=base).json()
    assert plain.get("prompt_logprobs") is None
    streamed = http.post(
        "/v1/chat/completions", json={**base, "stream": True, "prompt_logprobs": 1}
    )
    assert streamed.status_code == 400
    assert streamed.json()["error"]["param"] == "prompt_logprobs"


BAD_PARAMETERS = [
    ({"temperature": -1}, "temperature"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"n": 2, "best_of": 1}, "best_of"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"bad_words": [" "]}, "bad_words"),
    ({"allowed_token_ids": [10**8]}, "allowed_token_ids"),  # checked against the vocabulary
    ({"logprobs": 21}, "logprobs"),  # checked by the engine (--max-logprobs 20)
    ({"max_tokens": 10**6}, "max_tokens"),  # checked by the engine (context length)
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
]
# The official client's own keyword arguments; the rest travel in extra_body (vLLM's).
OPENAI_COMPLETION_ARGS = {"temperature", "n", "best_of", "max_tokens", "logprobs",
                          "frequency_penalty"}  # fmt: skip


@pytest.mark.parametrize(("body", "param"), BAD_PARAMETERS)
def test_a_bad_parameter_is_named_in_the_error_body(
    server: Any, body: dict[str, Any], param: str
) -> None:
    """The error's `param` comes from the validation that failed (ParameterError), as the
    official client reads it."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    args = {"max_tokens": 4, **{k: v for k, v in body.items() if k in OPENAI_COMPLETION_ARGS}}
    extra = {k: v for k, v in body.items() if k not in OPENAI_COMPLETION_ARGS}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, extra_body=extra, **args)
    assert err.value.param == param, err.value.message


def test_kserve_v2_generate_takes_prompt_logprobs_and_best_of(http: httpx.Client) -> None:
    """V2 generate (and generate_stream, in its first event) answer prompt_logprobs as
    /v1/completions does; best_of picks the same sample; infer has no field for them."""
    v2 = f"/v2/models/{MODEL}"
    params = {"max_tokens": 3, "temperature": 0, "ignore_eos": True, "apply_chat_template": False}
    ask = {"text_input": PROMPT, "parameters": {**params, "prompt_logprobs": 2}}
    resp = http.post(f"{v2}/generate", json=ask)
    assert resp.status_code == 200, resp.text
    expected = completion(http, prompt_logprobs=2, max_tokens=3)["choices"][0]
    entries = resp.json()["prompt_logprobs"]
    assert entries == expected["prompt_logprobs"] and len(entries) > 2
    stream = http.post(f"{v2}/generate_stream", json=ask)
    events = [json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data:")]
    assert events[0]["prompt_logprobs"] == entries
    assert all("prompt_logprobs" not in e for e in events[1:])
    assert "".join(e["text_output"] for e in events) == expected["text"]
    sampled = {"max_tokens": 4, "temperature": 1.0, "seed": 7, "best_of": 3}
    resp = http.post(f"{v2}/generate", json={"text_input": PROMPT, **params, **sampled})
    assert resp.json()["text_output"] == completion(http, **sampled)["choices"][0]["text"]
    refused = http.post(f"{v2}/generate_stream", json={"text_input": PROMPT, "best_of": 2})
    assert refused.status_code == 400 and "best_of" in refused.text
    tensor = {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [PROMPT]}
    body = {"inputs": [tensor], "parameters": {"prompt_logprobs": 1}}
    resp = http.post(f"{v2}/infer", json=body)
    assert resp.status_code == 400 and "prompt_logprobs" in resp.text
