"""The sampler's processors reach it from every API: OpenAI completions and chat, and KServe
V2 `parameters` (tiny model, real server)."""

from __future__ import annotations

import json
from typing import Any

import httpx

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
