"""KServe's own Python SDK against `pinnace serve --grpc-port` (a real process): REST V1 and
V2 (binary tensors in and out) and gRPC, each live, ready and infer."""

from __future__ import annotations

import asyncio
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
import numpy as np
import pytest
from kserve import (
    InferenceGRPCClient,
    InferenceRESTClient,
    InferInput,
    InferRequest,
    RESTConfig,
)
from kserve.protocol.infer_type import RequestedOutput

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


def _texts(values: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).ravel()]


def _request(binary: bool) -> InferRequest:
    tensor = InferInput("text_input", [len(PROMPTS)], "BYTES")
    tensor.set_data_from_numpy(np.array(PROMPTS, dtype=np.object_), binary_data=binary)
    output = RequestedOutput("text_output", {"binary_data": binary})
    return InferRequest(
        model_name=MODEL,
        infer_inputs=[tensor],
        parameters=dict(GREEDY),
        request_outputs=[output],
    )


def test_rest_v1_live_ready_predict(served: Served, expected: list[str]) -> None:
    async def run() -> tuple[bool, bool, Any]:
        async with InferenceRESTClient(RESTConfig(protocol="v1")) as client:
            live = await client.is_server_live(served.url)
            ready = await client.is_model_ready(served.url, MODEL)
            body = {"instances": PROMPTS, "parameters": GREEDY}
            return live, ready, await client.infer(served.url, body, model_name=MODEL)

    live, ready, result = asyncio.run(run())
    assert live is True and ready is True
    assert result["predictions"] == expected


@pytest.mark.parametrize("binary", [True, False])
def test_rest_v2_live_ready_infer(served: Served, expected: list[str], binary: bool) -> None:
    async def run() -> tuple[bool, bool, bool, Any]:
        async with InferenceRESTClient(RESTConfig(protocol="v2")) as client:
            live = await client.is_server_live(served.url)
            ready = await client.is_server_ready(served.url)
            model_ready = await client.is_model_ready(served.url, MODEL)
            result = await client.infer(served.url, _request(binary), model_name=MODEL)
            return live, ready, model_ready, result

    live, ready, model_ready, result = asyncio.run(run())
    assert live and ready and model_ready
    (output,) = result.outputs
    assert output.name == "text_output" and _texts(output.as_numpy()) == expected


@pytest.mark.parametrize("binary", [True, False])
def test_grpc_live_ready_infer(served: Served, expected: list[str], binary: bool) -> None:
    async def run() -> tuple[bool, bool, bool, Any]:
        client = InferenceGRPCClient(served.grpc_address, timeout=60)
        try:
            live = await client.is_server_live()
            ready = await client.is_server_ready()
            model_ready = await client.is_model_ready(MODEL)
            return live, ready, model_ready, await client.infer(_request(binary))
        finally:
            await client.close()

    live, ready, model_ready, result = asyncio.run(run())
    assert live and ready and model_ready
    (output,) = result.outputs
    assert _texts(output.as_numpy()) == expected
