"""Two `pinnace serve` processes as two nodes on 127.0.0.1 (nnodes=2, TP=2, one rank each,
gloo): the leader (explicit flags) answers the official openai client like TP=1, the
worker (a LeaderWorkerSet pod's environment only) serves no API; killing the worker node
makes the leader unhealthy and exit non-zero within 30 s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.distributed.parallel_state import free_port

# Two servers' worth of processes (leader, its engine core, the worker node): ~30-35 s
# on the shared 2-core machine; the only test of the multi-node start-up end to end. (The
# worker's side of a clean close and of a dead leader: test_node_health.py, in-process.)
pytestmark = pytest.mark.slow

PINNACE = str(Path(sys.executable).with_name("pinnace"))
ENGINE = ["--dtype", "float32", "--kv-cache-memory", "16MiB", "--max-model-len", "128"]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("w") as out:
        return subprocess.Popen(
            [PINNACE, "serve", *args], cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, **env}, start_new_session=True,
        )  # fmt: skip


def test_two_nodes_answer_like_tp1_and_the_leader_fails_when_a_node_dies(
    tmp_path: Path, make_tiny_model: Callable[[str], Path]
) -> None:
    model = str(make_tiny_model("LlamaForCausalLM"))
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    tp1 = LLM(model, dtype="float32", max_model_len=128, num_kv_blocks=16)
    expected = tp1.generate(["Hello there"], greedy)[0].outputs[0].text
    tp1.shutdown()

    port, master_port = free_port(), free_port()
    group = ["--tensor-parallel-size", "2", "--master-port", str(master_port)]
    lws = {"LWS_LEADER_ADDRESS": "127.0.0.1", "LWS_GROUP_SIZE": "2", "LWS_WORKER_INDEX": "1"}
    leader_log, worker_log = tmp_path / "leader.log", tmp_path / "worker.log"
    leader = _start(
        [model, "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny",
         "--nnodes", "2", "--node-rank", "0", "--master-addr", "127.0.0.1", *group, *ENGINE],
        leader_log, {"PINNACE_NODE_TIMEOUT_S": "3"},
    )  # fmt: skip
    worker = _start([model, *group], worker_log, lws)
    logs = lambda: f"{leader_log.read_text()[-2500:]}\n--- worker\n{worker_log.read_text()[-2500:]}"  # noqa: E731
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 150
        while not _healthy(url):
            assert leader.poll() is None and worker.poll() is None, logs()
            assert time.monotonic() < deadline, logs()
            time.sleep(0.3)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        whole = client.completions.create(
            model="tiny", prompt="Hello there", max_tokens=8, temperature=0.0
        )
        streamed = client.completions.create(
            model="tiny", prompt="Hello there", max_tokens=8, temperature=0.0, stream=True
        )
        assert whole.choices[0].text == expected
        assert "".join(chunk.choices[0].text for chunk in streamed) == expected
        assert "tensor-parallel rank 1 of 2" in worker_log.read_text()  # rank 1 is node 1's
        assert "Node 1 of 2: ranks 1..1" in worker_log.read_text()

        os.killpg(worker.pid, signal.SIGKILL)  # the worker node's pod is gone
        worker.wait()
        killed = time.monotonic()
        while _healthy(url):
            assert time.monotonic() - killed < 30, "still healthy with a dead node"
            time.sleep(0.2)
        code = leader.wait(timeout=max(1.0, 30 - (time.monotonic() - killed)))
        assert code != 0
        assert "node 1 sent no heartbeat" in leader_log.read_text(), logs()
    finally:
        for proc in (leader, worker):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
