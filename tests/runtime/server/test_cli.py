"""`pinnace serve`: flags, one-line errors with exit code 2, and a real start-up."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from pinnace.cli.main import build_parser, main
from pinnace.cli.serve import build_config, default_served_name, parse_bytes

PINNACE = str(Path(sys.executable).with_name("pinnace"))
FLAGS = [
    "--host", "--port", "--served-model-name", "--dtype", "--max-model-len", "--max-num-seqs",
    "--max-num-batched-tokens", "--block-size", "--enable-prefix-caching",
    "--no-enable-prefix-caching", "--gpu-memory-utilization", "--kv-cache-memory", "--api-key",
    "--chat-template", "--seed", "--max-waiting-requests", "--metrics-prefix-vllm",
    "--quantization", "--kv-cache-dtype", "--tensor-parallel-size", "--enable-lora",
    "--lora-modules", "--max-loras", "--max-lora-rank", "--max-cpu-loras", "--grpc-port",
    "--runner", "--convert", "--task", "--pipeline-parallel-size", "--nnodes", "--node-rank",
    "--master-addr", "--master-port", "--threads", "--no-quantize-lm-head",
]  # fmt: skip


def test_help_lists_every_flag(tmp_path: Path) -> None:
    out = subprocess.run(
        [PINNACE, "serve", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    missing = [flag for flag in FLAGS if flag not in out.stdout]
    assert not missing
    assert "PINNACE_API_KEY" in out.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5G", 1_500_000_000), ("4096", 4096),
     ("64 mib", 64 * 2**20), ("10kB", 10_000)],
)  # fmt: skip
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_default_served_name(tmp_path: Path) -> None:
    assert default_served_name("/x/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct"
    assert default_served_name("/x/qwen2.5-0.5b-instruct-q8_0.gguf") == "qwen2.5-0.5b-instruct"
    assert default_served_name("/x/model.f16.gguf") == "model"
    assert default_served_name("/x/plain.gguf") == "plain"
    folder = tmp_path / "Qwen2.5-0.5B-Instruct"
    folder.mkdir()
    assert default_served_name(f"{folder}/") == "Qwen2.5-0.5B-Instruct"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["/no/such/model"], "does not exist"),
        (["{model}", "--kv-cache-memory", "lots"], "--kv-cache-memory"),
        (["{model}", "--kv-cache-memory", "0"], "--kv-cache-memory"),
        (["{model}", "--pipeline-parallel-size", "0"], "pipeline_parallel_size must be"),
        (["{model}", "-tp", "2", "--nnodes", "2"], "needs master_addr"),
        (["{model}", "-tp", "3", "--nnodes", "2", "--master-addr", "h"], "split evenly"),
        (["{model}", "--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], "node_rank"),
        (["{model}", "--quantization", "bogus"], "quantization 'bogus'"),
        (["{model}", "--lora-modules", "a=/b"], "--enable-lora"),
        (["{model}", "--enable-lora", "--lora-modules", "a"], "'a' is not NAME=PATH"),
        (["{model}", "--enable-lora", "--lora-modules", "a=/b", "a=/c"], "names 'a' twice"),
        (["{model}", "--enable-lora", "--max-loras", "0"], "max_loras"),
        (["{model}", "--enable-lora", "--max-loras", "4", "--max-cpu-loras", "2"], "max_cpu_loras"),
        (["{model}", "--kv-cache-dtype", "bogus"], "'bogus'"),
        (["{model}", "--max-num-seqs", "0"], "max_num_seqs"),
        (["{model}", "--gpu-memory-utilization", "2"], "gpu_memory_utilization"),
        (["{model}", "--port", "70000"], "--port"),
        (["{model}", "--grpc-port", "0"], "--grpc-port must be in 1..65535"),
        (["{model}", "--port", "9000", "--grpc-port", "9000"], "both 9000"),
        (["{model}", "--chat-template", "missing.jinja"], "missing.jinja"),
        (["{model}", "--max-waiting-requests", "0"], "max_waiting_requests"),
        (["{model}", "--task", "embed", "--runner", "generate"], "contradicts --runner"),
        (["{model}", "--runner", "generate", "--convert", "embed"], "needs runner pooling"),
        (["{model}", "--speculative-config", "{method: ngram}"], "not valid JSON"),
        (["{model}", "--speculative-config", "[4]"], "must be a JSON object"),
        (["{model}", "--speculative-config", '{"method": "ngram"}'], "num_speculative_tokens"),
        (
            [
                "{model}",
                "--runner",
                "pooling",
                "--speculative-config",
                '{"method": "ngram", "num_speculative_tokens": 2}',
            ],
            "needs runner 'generate'",
        ),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], needle: str
) -> None:
    argv = ["serve", *(a.replace("{model}", str(tmp_path)) for a in args)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pinnace serve: error:") and "\n" not in err
    assert needle in err


@pytest.mark.parametrize(
    ("flags", "runner", "convert"),
    [([], "auto", "auto"), (["--runner", "pooling"], "pooling", "auto"),
     (["--task", "embed"], "pooling", "auto"), (["--task", "generate"], "generate", "auto"),
     (["--task", "embedding", "--runner", "pooling"], "pooling", "auto"),
     (["--convert", "embed"], "auto", "embed")],
)  # fmt: skip
def test_runner_flags(tmp_path: Path, flags: list[str], runner: str, convert: str) -> None:
    args = build_parser().parse_args(["serve", str(tmp_path), *flags])
    config, _ = build_config(args)
    assert (config.runner, config.convert) == (runner, convert)


def test_speculative_config_flag() -> None:
    text = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}'
    args = build_parser().parse_args(["serve", ".", "--speculative-config", text])
    config, _ = build_config(args)
    assert config.speculative is not None
    assert (config.speculative.method, config.speculative.num_speculative_tokens) == ("ngram", 4)
    assert (config.speculative.prompt_lookup_min, config.speculative.prompt_lookup_max) == (4, 4)


def test_quantize_lm_head_flag() -> None:
    def keeps(*flags: str) -> bool:
        config, _ = build_config(build_parser().parse_args(["serve", ".", *flags]))
        return config.quantize_lm_head

    assert keeps("--quantization", "int8")
    assert not keeps("--quantization", "int8", "--no-quantize-lm-head")


def test_threads_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    def threads(*flags: str) -> int | None:
        config, _ = build_config(build_parser().parse_args(["serve", ".", *flags]))
        return config.num_threads

    monkeypatch.delenv("PINNACE_NUM_THREADS", raising=False)
    assert threads() is None
    assert threads("--threads", "3") == 3
    monkeypatch.setenv("PINNACE_NUM_THREADS", "2")
    assert threads() == 2 and threads("--threads", "5") == 5  # the flag wins
    monkeypatch.setenv("PINNACE_NUM_THREADS", "two")
    with pytest.raises(ValueError, match="PINNACE_NUM_THREADS must be a positive integer"):
        threads()
    monkeypatch.delenv("PINNACE_NUM_THREADS")
    with pytest.raises(ValueError, match="num_threads"):
        threads("--threads", "0")


def test_parallel_flags_and_leaderworkerset_env(monkeypatch: pytest.MonkeyPatch) -> None:
    def parallel(*flags: str) -> tuple[object, ...]:
        config, _ = build_config(build_parser().parse_args(["serve", ".", *flags]))
        return (config.tensor_parallel_size, config.pipeline_parallel_size, config.nnodes,
                config.node_rank, config.master_addr, config.master_port)  # fmt: skip

    for name in ("LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX"):
        monkeypatch.delenv(name, raising=False)
    assert parallel() == (1, 1, 1, 0, None, None)
    explicit = ["-tp", "8", "-pp", "2", "--nnodes", "2", "--node-rank", "1"]
    assert parallel(*explicit, "--master-addr", "h", "--master-port", "7") == (
        8, 2, 2, 1, "h", 7
    )  # fmt: skip
    monkeypatch.setenv("LWS_LEADER_ADDRESS", "llm-0.llm.ns")
    monkeypatch.setenv("LWS_GROUP_SIZE", "2")
    monkeypatch.setenv("LWS_WORKER_INDEX", "1")
    # A LeaderWorkerSet pod: the group from its environment, the default port across nodes.
    assert parallel("-tp", "8", "-pp", "2") == (8, 2, 2, 1, "llm-0.llm.ns", 29500)
    assert parallel("-tp", "16", "--node-rank", "0") == (16, 1, 2, 0, "llm-0.llm.ns", 29500)
    monkeypatch.setenv("LWS_WORKER_INDEX", "one")
    with pytest.raises(ValueError, match="LWS_WORKER_INDEX='one' is not an integer"):
        parallel("-tp", "16")


def test_grpc_without_its_proto_says_where_to_point(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PINNACE_OIP_PROTO", str(tmp_path / "missing.proto"))
    assert main(["serve", str(tmp_path), "--grpc-port", "8081"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pinnace serve: error:") and "\n" not in err
    assert "PINNACE_OIP_PROTO" in err and "grpc_predict_v2.proto" in err


def test_bad_flag_in_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    out = subprocess.run(
        [PINNACE, "serve", str(tmp_path), "--pipeline-parallel-size", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "pinnace serve: error: pipeline_parallel_size must be a positive integer, got 0."
    ]


def test_bad_input_found_by_the_engine_core_is_one_line_and_exit_2(
    tmp_path: Path, tiny_model: Path
) -> None:
    """The core process finds this one while it builds the engine (the draft model opens
    there): its ValueError / FileNotFoundError reaches the front end as such. Before, the
    core logged a traceback, the front end raised a second one and exited 1."""
    draft = tmp_path / "no-such-draft"
    spec = f'{{"model": "{draft}", "num_speculative_tokens": 2}}'
    out = subprocess.run(
        [PINNACE, "serve", str(tiny_model), "--port", str(free_port()),
         "--kv-cache-memory", "32MiB", "--speculative-config", spec],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("pinnace serve: error: model path") and str(draft) in line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_starts_logs_and_answers(tmp_path: Path, tiny_model: Path) -> None:
    port = free_port()
    env = {**os.environ, "PINNACE_API_KEY": "k"}
    args = [PINNACE, "serve", str(tiny_model), "--host", "127.0.0.1", "--port", str(port),
            "--kv-cache-memory", "32MiB", "--max-model-len", "128",
            "--served-model-name", "tiny", "alias"]  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not _healthy(url):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        headers = {"Authorization": "Bearer k"}
        models = httpx.get(f"{url}/v1/models", headers=headers).json()
        assert [m["id"] for m in models["data"]] == ["tiny", "alias"]
        body: dict[str, Any] = {"model": "alias", "messages": [{"role": "user", "content": "Hi"}],
                                "max_tokens": 3}  # fmt: skip
        chat = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers)
        assert chat.status_code == 200 and chat.json()["model"] == "alias"
        assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    text = log.read_text()
    assert code == 0, text
    assert "Loaded LlamaForCausalLM" in text
    assert re.search(r"KV cache.*= \d+ tokens", text) and "max_model_len 128" in text
    assert f"http://127.0.0.1:{port}" in text and "API key required" in text
    # Both processes froze their start-up heap (torch, transformers: far over 10^5 objects)
    # out of the garbage collector's full collections.
    for process in ("front end", "engine core"):
        found = re.search(rf"{process}: (\d+) start-up objects frozen", text)
        assert found and int(found[1]) > 100_000, text


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
