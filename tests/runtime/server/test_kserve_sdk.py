"""KServe's own Python SDK against `pinnace serve --grpc-port` (a real process): REST V1 and
V2 (binary tensors in and out) and gRPC, each live, ready and infer."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

PINNACE = str(Path(sys.executable).with_name("pinnace"))
MODEL = "tiny"
PROMPTS = ["What is the capital of France?", "Name a color:", "Count: one, two,"]
GREEDY = {"max_tokens": 8, "temperature": 0}


@dataclass
class Served:
    url: str
    grpc_address: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    port, grpc_port = _free_port(), _free_port()
    args = [PINNACE, "serve", str(tiny_model), "--host", "127.0.0.1", "--port", str(port),
            "--grpc-port", str(grpc_port), "--kv-cache-memory", "32MiB",
            "--max-model-len", "128", "--served-model-name", MODEL]  # fmt: skip
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "PINNACE_API_KEY"}
    with log.open("w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield Served(url, f"127.0.0.1:{grpc_port}")
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    assert code == 0, log.read_text()
    assert f"gRPC V2 at 127.0.0.1:{grpc_port}" in log.read_text()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def expected(served: Served) -> list[str]:
    texts = []
    for prompt in PROMPTS:
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **GREEDY}
        resp = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=60).json()
        texts.append(resp["choices"][0]["message"]["content"])
    return texts


# KServe's SDK runs in a process of its own: its generated gRPC module and Triton's (which
# other test modules import) both register `inference.*` in protobuf's global pool, and
# the second to load fails. The script prints what each client call returned, as JSON.
CLIENT_SCRIPT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput

url, grpc_address, model = sys.argv[1:4]
prompts, params = json.loads(sys.argv[4]), json.loads(sys.argv[5])

def request(binary):
    tensor = InferInput("text_input", [len(prompts)], "BYTES")
    tensor.set_data_from_numpy(np.array(prompts, dtype=np.object_), binary_data=binary)
    output = RequestedOutput("text_output", {"binary_data": binary})
    return InferRequest(model_name=model, infer_inputs=[tensor], parameters=dict(params),
                        request_outputs=[output])

def texts(response):
    [output] = response.outputs
    return [v.decode() if isinstance(v, bytes) else str(v) for v in output.as_numpy().ravel()]

async def main():
    out = {}
    async with InferenceRESTClient(RESTConfig(protocol="v1")) as client:
        out["v1"] = {
            "live": await client.is_server_live(url),
            "ready": await client.is_model_ready(url, model),
            "texts": (await client.infer(url, {"instances": prompts, "parameters": params},
                                         model_name=model))["predictions"],
        }
    async with InferenceRESTClient(RESTConfig(protocol="v2")) as client:
        for binary in (True, False):
            out[f"v2-binary={binary}"] = {
                "live": await client.is_server_live(url),
                "ready": await client.is_server_ready(url)
                and await client.is_model_ready(url, model),
                "texts": texts(await client.infer(url, request(binary), model_name=model)),
            }
    client = InferenceGRPCClient(grpc_address, timeout=60)
    try:
        for binary in (True, False):
            out[f"grpc-binary={binary}"] = {
                "live": await client.is_server_live(),
                "ready": await client.is_server_ready() and await client.is_model_ready(model),
                "texts": texts(await client.infer(request(binary))),
            }
    finally:
        await client.close()
    print(json.dumps(out))

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def answers(served: Served) -> dict[str, Any]:
    args = [served.url, served.grpc_address, MODEL, json.dumps(PROMPTS), json.dumps(GREEDY)]
    out = subprocess.run(
        [sys.executable, "-I", "-c", CLIENT_SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout.splitlines()[-1]))


@pytest.mark.parametrize(
    "client",
    ["v1", "v2-binary=True", "v2-binary=False", "grpc-binary=True", "grpc-binary=False"],
)
def test_kserve_client_live_ready_infer(
    answers: dict[str, Any], expected: list[str], client: str
) -> None:
    answer = answers[client]
    assert answer["live"] is True and answer["ready"] is True
    assert answer["texts"] == expected
