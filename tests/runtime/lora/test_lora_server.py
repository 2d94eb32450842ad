"""LoRA over HTTP: adapters as models (OpenAI + KServe V2), vLLM's load / unload
endpoints while other requests stream, errors, auth and metrics."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

BASE = "tiny"
KEY = "sk-lora"
AUTH = {"Authorization": f"Bearer {KEY}"}
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def server(start_lora_server: Any, lora_base: Path, adapter_dirs: dict[str, Path]) -> Iterator:
    settings = {
        "served_model_names": [BASE],
        "api_key": KEY,
        "metrics_prefixes": ["pinnace", "vllm"],
        "lora_modules": {"sql": str(adapter_dirs["sql"]), "chat": str(adapter_dirs["chat"])},
    }
    srv = start_lora_server(
        lora_base, settings, enable_lora=True, max_loras=2, max_cpu_loras=2, max_model_len=512
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def decode(lora_base: Path) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(lora_base)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def complete(client: httpx.Client, model: str, prompt: Any, max_tokens: int = NEW_TOKENS) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    resp = client.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == model
    return str(resp.json()["choices"][0]["text"])


def test_models_lists_adapters_with_their_parent(
    server: Any, adapter_dirs: dict[str, Path]
) -> None:
    models = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY).models.list().data
    assert [m.id for m in models] == [BASE, "sql", "chat"]
    base, sql, _ = (m.model_dump() for m in models)
    assert "parent" not in base and base["max_model_len"] == 512
    assert sql["parent"] == BASE and sql["root"] == str(adapter_dirs["sql"])
    assert "max_model_len" not in sql


def test_requests_pick_an_adapter_by_model_name(
    client: httpx.Client, lora_prompts: list, peft_reference: dict, decode: Any
) -> None:
    for model, ref in [(BASE, None), ("sql", "sql"), ("chat", "chat")]:
        text = complete(client, model, lora_prompts[2])
        assert text == decode(peft_reference[ref][2]), model
    chat = client.post(
        "/v1/chat/completions",
        json={"model": "sql", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert chat.status_code == 200 and chat.json()["model"] == "sql"


def test_unknown_adapter_is_404(client: httpx.Client) -> None:
    resp = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert resp.status_code == 404
    assert resp.json()["error"] == {
        "message": "The model `nope` does not exist.", "type": "NotFoundError", "param": "model",
        "code": 404,
    }  # fmt: skip
    assert client.post("/v2/models/nope/generate", json={"text_input": "x"}).status_code == 404


def test_kserve_v2_addresses_adapters_as_models(client: httpx.Client) -> None:
    assert client.get("/v2/models/sql/ready").json() == {"name": "sql", "ready": True}
    assert client.get("/v2/models/sql").json()["name"] == "sql"
    params = {"apply_chat_template": False, "max_tokens": NEW_TOKENS, "temperature": 0,
              "ignore_eos": True}  # fmt: skip
    v2 = client.post("/v2/models/sql/generate", json={"text_input": "SELECT", "parameters": params})
    assert v2.status_code == 200 and v2.json()["model_name"] == "sql"
    assert v2.json()["text_output"] == complete(client, "sql", "SELECT")
    assert v2.json()["text_output"] != complete(client, BASE, "SELECT")


def stream_tokens(server: Any, model: str, prompt: list[int], out: dict[str, Any]) -> None:
    """Stream a long completion; records its text and when its first chunk came."""
    body = {"model": model, "prompt": prompt, "max_tokens": 300, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    texts = []
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=120
    ) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                texts.append(json.loads(line[6:])["choices"][0]["text"])
                out["started"].set()
    out["text"] = "".join(texts)
    out["done"].set()


def lora_info(server: Any) -> list[dict[str, str]]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return [
        s.labels
        for family in text_string_to_metric_families(text)
        if family.name == "pinnace:lora_requests_info"
        for s in family.samples
    ]


def test_load_and_unload_while_others_stream(
    server: Any,
    client: httpx.Client,
    adapter_dirs: dict[str, Path],
    lora_prompts: list,
    peft_reference: dict,
    decode: Any,
) -> None:
    # Reference texts, each run alone.
    expected = {m: complete(client, m, lora_prompts[1], 300) for m in (BASE, "sql")}
    runs = {m: {"started": threading.Event(), "done": threading.Event()} for m in expected}
    threads = [
        threading.Thread(target=stream_tokens, args=(server, m, lora_prompts[1], runs[m]))
        for m in runs
    ]
    for t in threads:
        t.start()
    assert all(r["started"].wait(30) for r in runs.values())
    assert {"running_lora_adapters": "sql"}.items() <= lora_info(server)[0].items()

    resp = client.post(
        "/v1/load_lora_adapter", json={"lora_name": "poem", "lora_path": str(adapter_dirs["poem"])}
    )
    assert (resp.status_code, resp.text) == (
        200,
        "Success: LoRA adapter 'poem' added successfully.",
    )
    assert complete(client, "poem", lora_prompts[2]) == decode(peft_reference["poem"][2])
    resp = client.post("/v1/unload_lora_adapter", json={"lora_name": "chat"})
    assert (resp.status_code, resp.text) == (
        200, "Success: LoRA adapter 'chat' removed successfully."
    )  # fmt: skip
    assert not all(r["done"].is_set() for r in runs.values())  # they were still streaming
    for t in threads:
        t.join(120)
    assert {m: r["text"] for m, r in runs.items()} == expected

    assert client.post("/v1/completions", json={"model": "chat", "prompt": "x"}).status_code == 404
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [BASE, "sql", "poem"]
    info = lora_info(server)
    assert info[0]["max_lora"] == "2" and info[0]["running_lora_adapters"] == ""


def test_load_in_place_replaces_an_adapter(
    client: httpx.Client, adapter_dirs: dict[str, Path], lora_prompts: list, peft_reference: dict,
    decode: Any,
) -> None:  # fmt: skip
    body = {"lora_name": "swap", "lora_path": str(adapter_dirs["sql"])}
    assert client.post("/v1/load_lora_adapter", json=body).status_code == 200
    assert complete(client, "swap", lora_prompts[0]) == decode(peft_reference["sql"][0])
    body = {"lora_name": "swap", "lora_path": str(adapter_dirs["chat"]), "load_inplace": True}
    assert client.post("/v1/load_lora_adapter", json=body).status_code == 200
    assert complete(client, "swap", lora_prompts[0]) == decode(peft_reference["chat"][0])
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "swap"}).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "status", "kind", "needle"),
    [
        ("load", {"lora_name": "sql", "lora_path": "/x"}, 400, "InvalidUserInput",
         "The lora adapter 'sql' has already been loaded."),
        ("load", {"lora_name": "x", "lora_path": ""}, 400, "InvalidUserInput",
         "Both 'lora_name' and 'lora_path' must be provided."),
        ("load", {"lora_name": BASE, "lora_path": "/x"}, 400, "InvalidUserInput",
         "'tiny' is the name of the base model"),
        ("load", {"lora_name": "x", "lora_path": "/no/such"}, 404, "NotFoundError",
         "Loading lora x failed: No adapter found for /no/such"),
        ("load", {"lora_name": "big", "lora_path": "{rank}"}, 400, "BadRequestError",
         "Loading lora big failed: LoRA adapter 'big' "),
        ("load", {"lora_name": "emb", "lora_path": "{embed}"}, 400, "BadRequestError",
         "targets embed_tokens"),
        ("load", {"lora_name": "x"}, 400, "BadRequestError", "lora_path: Field required"),
        ("unload", {"lora_name": "nope"}, 404, "NotFoundError",
         "The lora adapter 'nope' cannot be found."),
        ("unload", {"lora_name": ""}, 400, "InvalidUserInput",
         "'lora_name' needs to be provided to unload a LoRA adapter."),
    ],
)  # fmt: skip
def test_bad_load_and_unload_requests(
    client: httpx.Client,
    bad_adapter_dirs: dict[str, Path],
    path: str,
    body: dict,
    status: int,
    kind: str,
    needle: str,
) -> None:
    body = {k: v.format(**bad_adapter_dirs) if isinstance(v, str) else v for k, v in body.items()}
    resp = client.post(f"/v1/{path}_lora_adapter", json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert needle in error["message"] and error["type"] == kind and error["code"] == status
    assert "x" not in [m["id"] for m in client.get("/v1/models").json()["data"]]


def test_load_and_unload_need_the_api_key(server: Any) -> None:
    for path in ("load", "unload"):
        resp = httpx.post(f"{server.url}/v1/{path}_lora_adapter", json={"lora_name": "sql"})
        assert resp.status_code == 401


def test_without_enable_lora_adapters_are_refused(start_lora_server: Any, lora_base: Path) -> None:
    srv = start_lora_server(lora_base, {"served_model_names": [BASE]}, max_model_len=128)
    try:
        resp = httpx.post(
            f"{srv.url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/a"}
        )
        assert resp.status_code == 400 and "--enable-lora" in resp.json()["error"]["message"]
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert "lora_requests_info" not in metrics
    finally:
        srv.stop()


def test_serve_flags_become_engine_and_server_settings(
    lora_base: Path, adapter_dirs: dict[str, Path]
) -> None:
    from pinnace.cli.main import build_parser
    from pinnace.cli.serve import build_config

    sql, chat = str(adapter_dirs["sql"]), str(adapter_dirs["chat"])
    as_json = json.dumps({"name": "chat", "path": chat, "base_model_name": BASE})
    args = build_parser().parse_args(
        ["serve", str(lora_base), "--enable-lora", "--lora-modules", f"sql={sql}", as_json,
         "--max-loras", "3", "--max-lora-rank", "32", "--max-cpu-loras", "5"]
    )  # fmt: skip
    config, settings = build_config(args)
    assert (config.enable_lora, config.max_loras, config.max_lora_rank) == (True, 3, 32)
    assert config.max_cpu_loras == 5
    assert settings.lora_modules == {"sql": sql, "chat": chat}


def test_a_lora_module_that_does_not_fit_stops_start_up(
    lora_base: Path, bad_adapter_dirs: dict[str, Path]
) -> None:
    from pinnace.runtime.config import EngineConfig
    from pinnace.runtime.server.app import ServerSettings, build_app

    engine = EngineConfig(str(lora_base), kv_cache_memory=16 * 2**20, enable_lora=True)
    settings = ServerSettings([BASE], lora_modules={"big": str(bad_adapter_dirs["rank"])})
    with pytest.raises(ValueError, match="above max_lora_rank=16"):
        build_app(engine, settings)
    with pytest.raises(ValueError, match="is the base model's served name"):
        ServerSettings([BASE], lora_modules={BASE: "/x"})
