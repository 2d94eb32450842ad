"""GPU benchmark for hack/gpu-check.sh: decode speed, graphs, backends, greedy parity.

    hack/bench/gpu.py [--out FILE]        on a CUDA machine (about 4 minutes on an H100)
    hack/bench/gpu.py --dry-run           the same wiring on CPU with tiny sizes (CI)

Prints one JSON object:
- decode_tok_s {1, 32, 128}: decode tokens/s of a random ~1B Llama (bf16), auto backend
  (FlashInfer + CUDA graphs when available); decode only: (tokens of a long run - tokens of
  a short run) / (time difference), same prompts
- batch1_hbm_share: batch-1 tok/s x weight bytes / HBM bandwidth (measured device copy
  bandwidth, and the card's nominal figure when its name is known); target >= 0.5
- graphs_vs_eager_batch1: tok/s with CUDA graphs / with --enforce-eager; target >= 2
- flashinfer_vs_torch_batch32: FlashInfer / torch backend tok/s, both eager (and FlashInfer
  with graphs / torch)
- parity[arch]: greedy tokens vs transformers on the same device in bf16: share of equal
  positions and the first mismatch (prompt, position); target >= 0.95

Every engine runs in its own process (one model in GPU memory at a time).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

NOMINAL_HBM_BYTES_S = {"H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12,
                       "A100-SXM4-80GB": 2.039e12, "A100": 1.555e12, "L40S": 0.864e12}  # fmt: skip
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)  # fmt: skip
LLAMA_TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, vocab_size=600)  # fmt: skip
PARITY_ARCHS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": dict(model_type="llama"),
    "Qwen2ForCausalLM": dict(model_type="qwen2"),
    "Qwen3ForCausalLM": dict(model_type="qwen3", head_dim=64),
    "MistralForCausalLM": dict(model_type="mistral", sliding_window=48),
    "Gemma2ForCausalLM": dict(model_type="gemma2", head_dim=64, query_pre_attn_scalar=64,
                              sliding_window=48, attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0),
    "Gemma3ForCausalLM": dict(model_type="gemma3_text", head_dim=64, query_pre_attn_scalar=64,
                              sliding_window=48,
                              layer_types=["sliding_attention", "full_attention"]),
    "Phi3ForCausalLM": dict(model_type="phi3"),
}  # fmt: skip
PARITY_TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                   initializer_range=0.2, vocab_size=600, pad_token_id=0)  # fmt: skip


def save_tokenizer(out: str) -> Any:
    """A byte-level BPE tokenizer trained here (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(["Hello, my name is Pinnace.", "1 2 3 4 5"] * 50, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    fast.save_pretrained(out)
    return fast


def save_model(out: str, arch: str, model_type: str, device: str, **config: Any) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = save_tokenizer(out)
    config.setdefault("vocab_size", len(tokenizer))
    cfg = AutoConfig.for_model(
        model_type, architectures=[arch], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **config,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):  # random init of 1B weights is minutes on CPU, seconds on GPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    return out


# -- one engine per process ------------------------------------------------------------------


def case_decode(case: dict[str, Any]) -> dict[str, Any]:
    """Decode tok/s per batch size for one engine configuration."""
    from pinnace.runtime import LLM, SamplingParams

    llm = LLM(
        case["model"], dtype="bfloat16", device=case["device"],
        attention_backend=case["backend"], enforce_eager=case["eager"],
        max_num_seqs=max(case["batches"]), gpu_memory_utilization=0.85,
        kv_cache_memory=2**28 if case["device"] == "cpu" else None,
    )  # fmt: skip
    short, long = case["out_lens"]
    out: dict[str, Any] = {"tok_s": {}, "weight_bytes": llm.llm_engine.parts.weight_bytes}
    out["backend"] = llm.llm_engine.parts.runner.backend.name
    out["cuda_graphs"] = llm.llm_engine.parts.runner.cuda_graphs is not None
    for batch in case["batches"]:
        prompts = [[(7 * i + j) % 500 + 3 for j in range(case["in_len"])] for i in range(batch)]

        def timed(n: int, prompts: list[list[int]] = prompts) -> float:
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            return time.perf_counter() - start

        timed(short)  # warm up (allocator, autotuning, JIT)
        t_short, t_long = timed(short), timed(long)
        # None when noise swamps the difference (tiny dry-run models)
        seconds = t_long - t_short
        out["tok_s"][str(batch)] = (
            round(batch * (long - short) / seconds, 1) if seconds > 0 else None
        )
    return out


def case_bandwidth(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    if case["device"] != "cuda":
        return {"copy_bytes_s": None, "device_name": "cpu"}
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "copy_bytes_s": 2 * x.numel() * 20 / seconds,
        "device_name": torch.cuda.get_device_name(),
    }


def case_parity(case: dict[str, Any]) -> dict[str, Any]:
    """Greedy tokens of Pinnace vs transformers, bf16, on the device, per architecture."""
    import torch
    from transformers import AutoModelForCausalLM

    from pinnace.runtime import LLM, SamplingParams

    results: dict[str, Any] = {}
    prompts = [[5, 6, 7, 8], list(range(100, 164)), list(range(300, 340))]
    steps = case["max_tokens"]
    for arch, extra in PARITY_ARCHS.items():
        extra = dict(extra)
        with tempfile.TemporaryDirectory() as tmp:
            path = save_model(tmp, arch, extra.pop("model_type"), case["device"],
                              **PARITY_TINY, **extra)  # fmt: skip
            llm = LLM(path, dtype="bfloat16", device=case["device"], num_kv_blocks=256)
            params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
            ours = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            backend = llm.llm_engine.parts.runner.backend.name
            del llm
            gc.collect()
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
            hf = hf.to(case["device"]).eval()
            same = total = 0
            first = None
            for p, (prompt, got) in enumerate(zip(prompts, ours, strict=True)):
                ids = torch.tensor([prompt], device=case["device"])
                ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                  min_new_tokens=steps, do_sample=False)  # fmt: skip
                ref = ref[0, len(prompt) :].tolist()
                for j, (a, b) in enumerate(zip(got, ref, strict=True)):
                    same += a == b
                    if a != b and first is None:
                        first = {"prompt": p, "position": j}
                total += len(ref)
            results[arch] = {"equal": round(same / total, 4), "first_mismatch": first,
                             "backend": backend}  # fmt: skip
            del hf
    return results


CASES = {"decode": case_decode, "bandwidth": case_bandwidth, "parity": case_parity}


def run_case(case: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One case in a fresh process; its JSON result, or {"error": ...}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the wiring")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        case = json.loads(args.case)
        print(json.dumps(CASES[case.pop("kind")](case)))
        return 0
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    batches = [1, 2, 4] if dry else [1, 32, 128]
    mid = batches[1]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        model = save_model(work, "LlamaForCausalLM", "llama", device,
                           **(LLAMA_TINY if dry else LLAMA_1B))  # fmt: skip
        base = dict(kind="decode", model=model, device=device, in_len=8 if dry else 64,
                    out_lens=[4, 36] if dry else [16, 144])  # fmt: skip
        limit = 120 if dry else 240
        auto = run_case({**base, "backend": "auto", "eager": False, "batches": batches}, limit)
        eager = run_case({**base, "backend": "auto", "eager": True, "batches": batches[:2]}, limit)
        torch_b = run_case({**base, "backend": "torch", "eager": True, "batches": [mid]}, limit)
        bandwidth = run_case({"kind": "bandwidth", "device": device}, 60)
        parity = run_case({"kind": "parity", "device": device, "max_tokens": 8 if dry else 32},
                          limit)  # fmt: skip
    tok = auto.get("tok_s", {})
    eager_tok = eager.get("tok_s", {})
    hbm: dict[str, Any] = {"device_name": bandwidth.get("device_name")}
    weight_bytes = auto.get("weight_bytes")
    if tok.get("1") and weight_bytes:
        streamed = tok["1"] * weight_bytes  # bytes read per second at batch 1 (weights)
        hbm["measured_copy"] = ratio(streamed, bandwidth.get("copy_bytes_s"))
        name = str(bandwidth.get("device_name"))
        nominal = next((v for k, v in NOMINAL_HBM_BYTES_S.items() if k in name), None)
        hbm["nominal"] = ratio(streamed, nominal)
    summary = {
        "bench": "gpu", "dry_run": dry, "device": device,
        "model": "random Llama " + ("tiny" if dry else "~1B") + " bf16",
        "weight_bytes": weight_bytes,
        "decode_tok_s": tok, "backend": auto.get("backend"),
        "cuda_graphs": auto.get("cuda_graphs"),
        "batch1_hbm_share": hbm,
        "graphs_vs_eager_batch1": ratio(tok.get("1"), eager_tok.get("1")),
        f"flashinfer_vs_torch_batch{mid}": {
            "eager": ratio(eager_tok.get(str(mid)), torch_b.get("tok_s", {}).get(str(mid))),
            "with_graphs": ratio(tok.get(str(mid)), torch_b.get("tok_s", {}).get(str(mid))),
            "backends": [eager.get("backend"), torch_b.get("backend")],
        },
        "parity": parity,
        "errors": {k: v["error"] for k, v in (("decode", auto), ("eager", eager),
                   ("torch", torch_b), ("bandwidth", bandwidth), ("parity", parity))
                   if "error" in v},
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    text = json.dumps(summary)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
