"""What the distributed test modules share: a group whose rank 1 is a spawned worker, and the
4-layer, one-KV-head Llama the pipeline tests split."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest
import torch

from pinnace.runtime.config import EngineConfig
from pinnace.runtime.distributed.parallel_state import (
    ParallelGroup,
    destroy_group,
    free_port,
    init_group,
)
from pinnace.runtime.executor.multiproc import run_worker, wait_joining


@contextlib.contextmanager
def two_rank_group(config: EngineConfig) -> Iterator[tuple[ParallelGroup, BaseProcess]]:
    """Rank 0 in this process, rank 1 in a spawned worker that serves every engine built on
    the group until rank 0 broadcasts None; the worker must then exit cleanly."""
    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=run_worker, args=(config, 1, "127.0.0.1", port, os.getpid(), sender), daemon=True
    )
    proc.start()
    sender.close()
    threads = torch.get_num_threads()
    try:
        wait_joining([receiver], [proc])
        device = torch.device("cpu")
        rank0 = init_group(0, 2, config.tensor_parallel_size, "127.0.0.1", port, device)
        yield rank0, proc
        rank0.broadcast_object(None)  # no next engine: the worker exits
        proc.join(timeout=30)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
        destroy_group()
        torch.set_num_threads(threads)


GroupFactory = Callable[[EngineConfig], AbstractContextManager[tuple[ParallelGroup, BaseProcess]]]


@pytest.fixture(scope="session")
def spawned_group() -> GroupFactory:
    """`two_rank_group`, for the modules (test modules here are not importable packages)."""
    return two_rank_group


@pytest.fixture(scope="session")
def four_layers(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """4 layers whose weights outweigh the (512-token, untied) embedding and head, so a
    stage's share is about half; one KV head (replicated under TP=2)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1,
        max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("four_layers")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
