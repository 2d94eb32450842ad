"""Shared by the runtime tests: a real HTTP server in a thread, transformers' greedy
decoding as the reference the engine must match token for token, the native kernels'
lookups (fresh per test, or a skip where a kernel cannot run), and the real SmolLM2 opened
once with a full-sequence forward for perplexity and teacher-forced agreement."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import uvicorn

if TYPE_CHECKING:
    import torch


class ServerThread:
    """A `build_app` server on an ephemeral 127.0.0.1 port; `stop()` shuts the engine down."""

    def __init__(self, app: Any, api_key: str | None = None) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.app = app
        self.api_key = api_key
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.port = 0

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text


@pytest.fixture(scope="session")
def serve_app() -> Callable[..., ServerThread]:
    """serve_app(app, api_key=None) -> a started ServerThread."""
    return lambda app, api_key=None: ServerThread(app, api_key).start()


def hf_greedy(model: torch.nn.Module, prompt: list[int], num_tokens: int) -> list[int]:
    """transformers' greedy continuation, one prompt at a time (no padding), EOS not special."""
    import torch

    ids = torch.tensor([prompt])
    out: list[int] = []
    past = None
    with torch.inference_mode():
        for _ in range(num_tokens):
            res = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            ids = torch.tensor([[token]])
    return out


@pytest.fixture(scope="session", name="hf_greedy")
def hf_greedy_fixture() -> Callable[[torch.nn.Module, list[int], int], list[int]]:
    """hf_greedy(model, prompt, num_tokens) -> the reference tokens."""
    return hf_greedy


def _kernel_lookups() -> tuple[Any, ...]:
    from pinnace.runtime.kernels import bf16_gemv
    from pinnace.runtime.kernels.int8_digits import int8_digits_matmul
    from pinnace.runtime.kernels.int8_gemv import int8_gemv
    from pinnace.runtime.kernels.llama_decode import llama_decode
    from pinnace.runtime.kernels.paged_attention import paged_decode_attention
    from pinnace.runtime.kernels.rms_norm import rms_norm

    return (
        bf16_gemv.bf16_gemv,
        bf16_gemv._lib,
        int8_digits_matmul,
        int8_gemv,
        llama_decode,
        paged_decode_attention,
        rms_norm,
    )


@pytest.fixture
def fresh_kernels() -> Iterator[None]:
    """Kernel lookups are cached per process and read the environment: a test that changes
    it (or a kernel's module attributes) starts and leaves with the caches empty."""
    for lookup in _kernel_lookups():
        lookup.cache_clear()
    yield
    for lookup in _kernel_lookups():
        lookup.cache_clear()


def kernel_unavailable(flags: tuple[str, ...]) -> str:
    """Why a kernel lookup gave None, as a skip reason; a kernel that failed to build where
    the CPU and a compiler are both present is a test failure, not a skip."""
    from pinnace.runtime.kernels import build

    if not build.enabled():
        return "native kernels turned off by PINNACE_NATIVE_KERNELS"
    missing = sorted(set(flags) - build.cpu_flags())
    if missing:
        return f"CPU without {', '.join(missing)}"  # on the CI skip guard's allowlist
    if build.compiler() is None:
        return "no C compiler to build the native kernels"
    pytest.fail("a native kernel failed to build on a CPU with its ISA and a compiler (log)")


@pytest.fixture
def native_kernel(fresh_kernels: None) -> Callable[[Any, tuple[str, ...]], Any]:
    """native_kernel(lookup, required_cpu_flags) -> the kernel, or skip the test."""

    def get(lookup: Any, flags: tuple[str, ...]) -> Any:
        kernel = lookup()
        if kernel is None:
            pytest.skip(kernel_unavailable(flags))
        return kernel

    return get


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf: str) -> Any:
    """The SmolLM2 GGUF opened once (config + tokenizer parsing takes ~10 s)."""
    from pinnace.runtime.models.loader import open_checkpoint

    return open_checkpoint(smollm2_gguf)


def sequence_logits(
    model: torch.nn.Module, config: Any, token_ids: list[int], kv_dtype: torch.dtype
) -> torch.Tensor:
    """Logits [T, vocab] of one prefill over `token_ids` through the paged torch backend,
    with a KV cache of `kv_dtype` (written, then read back, by every layer)."""
    import torch

    from pinnace.runtime.layers.attention import BatchLayout, get_attention_backend
    from pinnace.runtime.layers.attention.layer import attention_spec
    from pinnace.runtime.layers.forward_context import ForwardContext, forward_context
    from pinnace.runtime.worker.kv_cache import allocate_kv_caches

    device = torch.device("cpu")
    num, block = len(token_ids), 16
    num_blocks = math.ceil(num / block)
    dtype = next(model.parameters()).dtype
    backend = get_attention_backend("torch", device, attention_spec(model, dtype, kv_dtype))
    caches = allocate_kv_caches(config, num_blocks, block, kv_dtype, device, backend)
    layout = BatchLayout([num], [0], [list(range(num_blocks))], block, torch.arange(num), device)
    ctx = ForwardContext(backend, backend.build_metadata(layout), caches)
    with torch.inference_mode(), forward_context(ctx):
        hidden = model(torch.tensor(token_ids), torch.arange(num))
        return model.compute_logits(hidden)  # type: ignore[operator]


def perplexity(
    model: torch.nn.Module, config: Any, token_ids: list[int], kv_dtype: torch.dtype
) -> float:
    import torch
    import torch.nn.functional as F

    logits = sequence_logits(model, config, token_ids, kv_dtype)
    return math.exp(F.cross_entropy(logits[:-1].float(), torch.tensor(token_ids[1:])).item())


@pytest.fixture(scope="session")
def model_eval() -> SimpleNamespace:
    """`.sequence_logits(model, config, ids, kv_dtype)`, `.perplexity(...)` (same arguments)."""
    return SimpleNamespace(sequence_logits=sequence_logits, perplexity=perplexity)


@pytest.fixture(scope="session")
def hf_smollm2_bf16(smollm2_gguf: str) -> torch.nn.Module:
    """transformers' own SmolLM2 from the same GGUF file, dequantized to bfloat16."""
    import os

    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf),
        gguf_file=os.path.basename(smollm2_gguf),
        dtype=torch.bfloat16,
    ).eval()


@pytest.fixture(scope="session")
def make_draft_model(
    tmp_path_factory: pytest.TempPathFactory, make_tiny_model: Callable[[str], Path]
) -> Callable[[str], Path]:
    """make_draft_model(arch) -> a draft for the tiny `arch` model: a copy whose weights
    carry noise of 2 % of each tensor's spread, so its greedy tokens are the target's about
    half the time (speculation accepts and rejects at every position)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    cache: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in cache:
            target = make_tiny_model(arch)
            out = tmp_path_factory.mktemp(f"draft-{arch}")
            for item in target.iterdir():
                if item.suffix != ".safetensors":
                    shutil.copy(item, out / item.name)
            gen = torch.Generator().manual_seed(7)
            for file in target.glob("*.safetensors"):
                tensors = load_file(file)
                for name, t in tensors.items():
                    noise = torch.randn(t.shape, generator=gen, dtype=t.dtype)
                    tensors[name] = t + 0.02 * t.float().std() * noise
                save_file(tensors, out / file.name, metadata={"format": "pt"})
            cache[arch] = out
        return cache[arch]

    return make


class OracleProposer:
    """A speculative-decoding proposer for tests: proposes each prompt's known greedy
    continuation with one token wrong, at position 0, 1, ..., k - 1 in turn, and every
    (k + 1)-th proposal all right, so verification accepts and rolls back at every
    position. (Random tiny models rarely repeat themselves: n-gram proposals would be
    nearly all rejected there.)"""

    def __init__(
        self,
        continuations: dict[tuple[int, ...], list[int]],
        vocab_size: int,  # a wrong token is still a token of the vocabulary
        k: int = 4,
        errors: bool = True,
    ) -> None:
        self.continuations = continuations
        self.vocab_size = vocab_size
        self.k = k
        self.errors = errors  # False: every proposal right
        self.num_calls = 0

    def propose(self, items: list[Any], sampled: list[list[int]]) -> list[list[int]]:
        out = []
        for item, new in zip(items, sampled, strict=True):
            done = len(item.output_token_ids) + len(new)
            spec = list(self.continuations[tuple(item.prompt_token_ids)][done : done + self.k])
            wrong = self.num_calls % (self.k + 1)
            self.num_calls += 1
            if self.errors and wrong < len(spec):
                spec[wrong] = (spec[wrong] + 1) % self.vocab_size
            out.append(spec)
        return out


@pytest.fixture(scope="session", name="oracle_proposer")
def oracle_proposer_fixture() -> type[OracleProposer]:
    """OracleProposer(continuations: {prompt tuple: greedy tokens}, vocab_size, k=4,
    errors=True)."""
    return OracleProposer


@pytest.fixture(scope="session")
def flashinfer_reference() -> Any:
    """tests/runtime/flashinfer_reference.py: FlashInfer's wrapper API in torch, as a module
    standing in for `flashinfer` (loaded by path: test folders are not importable)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).with_name("flashinfer_reference.py")
    spec = importlib.util.spec_from_file_location("flashinfer_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["flashinfer_reference"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
