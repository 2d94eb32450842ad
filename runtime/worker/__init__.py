"""Tensor side of the engine: model runner, KV cache tensors, sampler."""
