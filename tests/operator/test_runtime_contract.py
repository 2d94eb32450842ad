"""The operator's side of the adapter contract against the real runtime server: a tiny
random-weight Llama, a real PEFT adapter, `build_app` served by uvicorn on 127.0.0.1.

What the operator relies on: `/v1/models` reports each adapter with the path it was loaded
from (so a steady pod costs one GET per pass, never a reload), errors come back as
messages a user can act on, and the API key guards it all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pinnace.operator.adapter_sync import AdapterSync
from pinnace.operator.runtime_client import (
    HttpRuntimeClient,
    PodEndpoint,
    RuntimeCallError,
    pod_url,
)

KEY = "sk-operator"


class Recording(HttpRuntimeClient):
    """The real client, counting its calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def list_adapters(self, pod: PodEndpoint, api_key: str | None) -> dict[str, str | None]:
        self.calls.append("list")
        return super().list_adapters(pod, api_key)

    def load_adapter(self, pod: PodEndpoint, api_key: str | None, name: str, path: str) -> None:
        self.calls.append(f"load {name}")
        super().load_adapter(pod, api_key, name, path)

    def unload_adapter(self, pod: PodEndpoint, api_key: str | None, name: str) -> None:
        self.calls.append(f"unload {name}")
        super().unload_adapter(pod, api_key, name)


@pytest.fixture(scope="module")
def adapter(make_tiny_model: Callable[[str], Path], tmp_path_factory: Any) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model("LlamaForCausalLM"))
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("adapter") / "sql"
    get_peft_model(model, config).save_pretrained(out)
    return Path(out)


@pytest.fixture(scope="module")
def runtime_pod(make_tiny_model: Callable[[str], Path]) -> Iterator[PodEndpoint]:
    import uvicorn

    from pinnace.runtime.config import EngineConfig
    from pinnace.runtime.server.app import ServerSettings, build_app

    model = make_tiny_model("LlamaForCausalLM")
    engine = EngineConfig(  # the core runs in a process of its own, as in the pod
        model=str(model),
        dtype="float32",
        kv_cache_memory=32 * 2**20,
        max_model_len=128,
        enable_lora=True,
        max_lora_rank=8,
    )
    app = build_app(engine, ServerSettings(served_model_names=["base"], api_key=KEY))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "runtime did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield PodEndpoint("runtime-0", "uid-0", pod_url("127.0.0.1", port))
    server.should_exit = True
    thread.join(15)


def test_sync_against_the_real_runtime_converges_and_stays_quiet(
    runtime_pod: PodEndpoint, adapter: Path
) -> None:
    client = Recording()
    sync = AdapterSync(client)
    scope = ("ml", "chat")
    [first] = sync.sync_pods(scope, [runtime_pod], {"sql": str(adapter)}, KEY)
    assert first.loaded == {"sql"} and first.errors == {} and first.unreachable is None
    assert client.list_adapters(runtime_pod, KEY) == {"sql": str(adapter)}  # root = its path
    client.calls.clear()
    sync.sync_pods(scope, [runtime_pod], {"sql": str(adapter)}, KEY)
    assert client.calls == ["list"]  # loaded as declared: nothing to do
    client.calls.clear()
    [gone] = sync.sync_pods(scope, [runtime_pod], {}, KEY)
    assert client.calls == ["list", "unload sql"] and gone.loaded == set()


def test_runtime_errors_reach_status_as_the_runtime_words_them(
    runtime_pod: PodEndpoint, tmp_path: Path
) -> None:
    client = HttpRuntimeClient()
    [outcome] = AdapterSync(client).sync_pods(
        ("ml", "chat"), [runtime_pod], {"missing": str(tmp_path / "nothing-here")}, KEY
    )
    assert outcome.errors["missing"] == (
        "POST /v1/load_lora_adapter: HTTP 404: Loading lora missing failed: "
        f"No adapter found for {tmp_path / 'nothing-here'}: not a folder."
    )
    client.unload_adapter(runtime_pod, KEY, "never-loaded")  # 404: already unloaded
    with pytest.raises(RuntimeCallError) as caught:
        client.list_adapters(runtime_pod, "wrong-key")
    assert caught.value.status == 401


def test_the_harness_fake_runtime_answers_as_the_real_one(
    runtime_pod: PodEndpoint, runtime_servers: Any, adapter: Path, tmp_path: Path
) -> None:
    """The operator tests run against harness/runtime_pods.py's FakeRuntime: the same calls
    to it and to the real server get the same status, body (error bodies as JSON, success
    texts verbatim) and WWW-Authenticate header."""
    fake = runtime_servers.serve(api_key=KEY)
    runtime_servers.write_adapter(str(adapter))  # the fake only looks for the config file
    (tmp_path / "empty").mkdir()
    (runtime_servers.root / str(tmp_path / "empty").lstrip("/")).mkdir(parents=True)
    load, unload = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
    calls = [
        (load, {"lora_name": "c", "lora_path": str(tmp_path / "absent")}, KEY),  # 404
        (load, {"lora_name": "c", "lora_path": str(tmp_path / "empty")}, KEY),  # 404
        (load, {"lora_name": "c", "lora_path": str(adapter)}, KEY),  # loaded
        (load, {"lora_name": "c", "lora_path": str(adapter)}, KEY),  # 400: already
        (unload, {"lora_name": "c"}, KEY),
        (unload, {"lora_name": "c"}, KEY),  # 404
        (load, {"lora_name": "c", "lora_path": str(adapter)}, "wrong"),  # 401
        (load, {"lora_name": "c", "lora_path": str(adapter)}, None),  # 401, no key
    ]
    answers: dict[str, list[tuple[Any, ...]]] = {}
    for url, who in ((runtime_pod.url, "real"), (f"http://127.0.0.1:{fake.port}", "fake")):
        with httpx.Client(base_url=url, timeout=10) as http:
            answers[who] = []
            for path, body, key in calls:
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                r = http.post(path, json=body, headers=headers)
                content = r.json() if r.status_code >= 400 else r.text  # errors: JSON
                answers[who].append((r.status_code, content, r.headers.get("WWW-Authenticate")))
    assert [a[0] for a in answers["real"]] == [404, 404, 200, 400, 200, 404, 401, 401]
    assert answers["fake"] == answers["real"]
