"""Weight quantization: int8 / FP8 weight-only layers, GPTQ / AWQ / GGUF 4-bit checkpoints
(the FP8 KV cache lives with the attention backends: layers/attention/fp8_kv.py).

    config.py      which method a model runs with (user choice vs config.json), validated
    int8.py fp8.py int4.py embedding.py   the quantized layers
    gptq.py awq.py gguf.py                checkpoint packings -> Int4Weight
    parts.py loading.py                   loading stored-quantized checkpoints
    convert.py                            quantizing float weights at load

Importing this package (or its config) does not import torch.
"""
