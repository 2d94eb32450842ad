"""`pinnace serve --tensor-parallel-size 2`: the official openai client gets answers (whole
and streamed); a killed worker rank makes /health fail and the server exit non-zero."""

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
import psutil
import pytest

from pinnace.runtime.distributed.parallel_state import free_port

# A real server with an engine core and a second rank process: ~20-35 s on the shared
# 2-core machine, the only test of the executor that spawns its own ranks.
pytestmark = pytest.mark.slow

PINNACE = str(Path(sys.executable).with_name("pinnace"))


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _worker_ranks(server_pid: int) -> list[psutil.Process]:
    """The spawned rank processes below the server (server -> engine core -> ranks)."""
    ranks = []
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                ranks.append(child)
        except psutil.Error:
            continue
    return ranks


def test_serve_tp2_answers_then_fails_loudly_when_a_rank_dies(
    tmp_path: Path, make_tiny_model: Callable[[str], Path]
) -> None:
    tiny_model = make_tiny_model("LlamaForCausalLM")
    port = free_port()
    args = [PINNACE, "serve", str(tiny_model), "--host", "127.0.0.1", "--port", str(port),
            "--tensor-parallel-size", "2", "--dtype", "float32", "--kv-cache-memory", "16MiB",
            "--max-model-len", "128", "--served-model-name", "tiny"]  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            args, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 150
        while not _healthy(url):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        whole = client.completions.create(
            model="tiny", prompt="Hello there", max_tokens=8, temperature=0.0
        )
        streamed = client.completions.create(
            model="tiny", prompt="Hello there", max_tokens=8, temperature=0.0, stream=True
        )
        text = "".join(chunk.choices[0].text for chunk in streamed)
        assert whole.choices[0].text and text == whole.choices[0].text
        assert "tensor-parallel rank 1 of 2" in log.read_text()

        [rank] = _worker_ranks(proc.pid)
        rank.kill()
        killed = time.monotonic()
        while _healthy(url):
            assert time.monotonic() - killed < 30, "still healthy with a dead rank"
            time.sleep(0.2)
        code = proc.wait(timeout=max(1.0, 30 - (time.monotonic() - killed)))
        assert code != 0
        assert "exited with status" in log.read_text()  # the log names the dead worker
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
