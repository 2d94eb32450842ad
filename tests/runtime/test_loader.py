"""Checkpoint loading: sharded safetensors, dtypes, clear errors for bad models/options."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.kernels.bf16_gemv import bf16_gemv

KV = 16 * 2**20


@pytest.fixture(scope="module")
def llama(make_tiny_model: Callable[[str], Path]) -> Path:
    return make_tiny_model("LlamaForCausalLM")


def test_sharded_checkpoint_loads_like_the_single_file(llama: Path, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    model.save_pretrained(sharded, max_shard_size="2MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (llama / name).exists():
            shutil.copy(llama / name, sharded / name)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ref = LLM(str(llama), dtype="float32", kv_cache_memory=KV).generate("Hi", params)
    out = LLM(str(sharded), dtype="float32", kv_cache_memory=KV).generate("Hi", params)
    assert out[0].outputs[0].token_ids == ref[0].outputs[0].token_ids


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("auto", torch.float32)],
)
def test_dtype_choice(llama: Path, dtype: str, expected: torch.dtype) -> None:
    llm = LLM(str(llama), dtype=dtype, kv_cache_memory=KV)
    assert llm.llm_engine.parts.dtype == expected
    # The logged weight bytes include the bf16 GEMV's plain copies of the linear weights.
    model = llm.llm_engine.runner.model
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    plain = any(getattr(m, "plain", None) is not None for m in model.modules())
    assert plain == (expected == torch.bfloat16 and bf16_gemv() is not None)
    assert (llm.llm_engine.parts.weight_bytes > params) == plain
    out = llm.generate("Hello", SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_num_threads_sets_the_one_pool(llama: Path) -> None:
    """torch's OpenMP pool, which the native kernels use too, takes the engine's setting."""
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1  # differs from the start, so an ignored setting fails
    try:
        LLM(str(llama), dtype="bfloat16", kv_cache_memory=KV, num_threads=wanted)
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)


def test_unknown_architecture_names_the_supported_ones(llama: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(llama, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"GPTNeoXForCausalLM.*supported: LlamaForCausalLM"):
        LLM(str(bad), kv_cache_memory=KV)


def test_missing_weights_and_paths_fail_clearly(llama: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        LLM(str(empty))
    partial = tmp_path / "partial"
    shutil.copytree(llama, partial)
    for f in partial.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(partial))


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"block_size": 0}, "block_size"),
        ({"max_num_seqs": -1}, "max_num_seqs"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"dtype": "int3"}, "dtype"),
        ({"max_model_len": 100000, "num_kv_blocks": 4}, "max_model_len"),
        ({"not_an_option": 1}, "unknown engine option"),
    ],
)
def test_invalid_engine_options(llama: Path, option: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LLM(str(llama), kv_cache_memory=KV, **option)


def test_generate_inputs_and_validation(llama: Path) -> None:
    llm = LLM(str(llama), dtype="float32", kv_cache_memory=KV, max_model_len=64)
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    by_text = llm.generate(["Paris is", "Rome is"], params, use_tqdm=False)
    ids = tok.encode("Paris is")
    by_ids = llm.generate([ids, {"prompt_token_ids": tok.encode("Rome is")}], params)
    assert [o.outputs[0].token_ids for o in by_ids] == [o.outputs[0].token_ids for o in by_text]
    assert by_text[0].prompt == "Paris is" and by_text[0].prompt_token_ids == ids
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate(["a"], [params, params])
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate("x " * 100, params)
    too_many = 64 - len(ids) + 1
    with pytest.raises(ValueError, match=f"max_tokens={too_many}"):
        llm.generate("Paris is", SamplingParams(max_tokens=too_many))
    with pytest.raises(ValueError, match="out of vocabulary"):
        llm.generate([[10**9]], params)
    # A rejected batch leaves nothing behind: the engine is idle and still works.
    assert not llm.llm_engine.has_unfinished_requests()
    assert (
        llm.generate("Paris is", params)[0].outputs[0].token_ids == by_text[0].outputs[0].token_ids
    )


def test_n_samples_share_the_prompt_and_differ(llama: Path) -> None:
    llm = LLM(str(llama), dtype="float32", kv_cache_memory=KV)
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    out = llm.generate("Once upon a time there was a little robot who", params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    texts = {tuple(c.token_ids) for c in out.outputs}
    assert len(texts) == 3  # distinct seeds per sample
    again = llm.generate("Once upon a time there was a little robot who", params)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    assert llm.llm_engine.stats().kv_cache_usage == 0.0


def test_stop_strings_and_stop_tokens(llama: Path) -> None:
    llm = LLM(str(llama), dtype="float32", kv_cache_memory=KV)
    base = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate("The", base)[0].outputs[0]
    stop_token = full.token_ids[5]
    out = llm.generate(
        "The", SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_token])
    )[0].outputs[0]
    assert out.token_ids == full.token_ids[: full.token_ids.index(stop_token) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_token)
    stop_text = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    if stop_text.strip():
        out = llm.generate("The", SamplingParams(temperature=0, max_tokens=24, stop=[stop_text]))[
            0
        ].outputs[0]
        assert out.text == full.text[: full.text.index(stop_text)]
        assert (out.finish_reason, out.stop_reason) == ("stop", stop_text)


def test_chat_applies_the_template(llama: Path) -> None:
    llm = LLM(str(llama), dtype="float32", kv_cache_memory=KV)
    out = llm.chat(
        [{"role": "user", "content": "Name three colors."}], SamplingParams(max_tokens=4)
    )
    text = llm.get_tokenizer().decode(out[0].prompt_token_ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="at least one message"):
        llm.chat([[]])
