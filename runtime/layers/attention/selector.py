"""Which attention backend a run uses: --attention-backend auto | torch | flashinfer."""

from __future__ import annotations

import logging

import torch

from pinnace.runtime.config import ATTENTION_BACKENDS
from pinnace.runtime.layers.attention.backend import AttentionBackend, AttentionSpec

logger = logging.getLogger("pinnace.runtime")


def get_attention_backend(name: str, device: torch.device, spec: AttentionSpec) -> AttentionBackend:
    """auto: FlashInfer on CUDA when it imports and fits the model, else the torch backend
    (with a log line saying why); on CPU the torch backend with the native decode kernel
    where it builds. flashinfer: FlashInfer or a ValueError saying why not."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; supported: {', '.join(ATTENTION_BACKENDS)}."
        )
    if name == "flashinfer":
        if device.type != "cuda":
            raise ValueError("attention backend 'flashinfer' needs a CUDA device.")
        backend = _flashinfer(spec, device, required=True)
        assert backend is not None  # required: unavailable raises
        return backend
    if name == "auto" and device.type == "cuda":
        backend = _flashinfer(spec, device, required=False)
        if backend is not None:
            return backend
    return _torch(spec, device)


def _torch(spec: AttentionSpec, device: torch.device) -> AttentionBackend:
    from pinnace.runtime.layers.attention.cpu_backend import CPUDecodeAttentionBackend
    from pinnace.runtime.layers.attention.torch_backend import TorchAttentionBackend

    if device.type == "cpu":
        native = CPUDecodeAttentionBackend.create(spec.num_kv_heads)
        if native is not None:
            return native
    return TorchAttentionBackend(spec.num_kv_heads)


def _flashinfer(
    spec: AttentionSpec, device: torch.device, required: bool
) -> AttentionBackend | None:
    from pinnace.runtime.layers.attention import flashinfer_backend

    reason = flashinfer_backend.unsupported_reason(spec)
    if reason is None:
        try:
            module = flashinfer_backend.import_flashinfer()
        except ImportError as e:
            reason = f"flashinfer does not import ({e}); it comes with the 'gpu' extra"
    if reason is not None:
        if required:
            raise ValueError(f"attention backend 'flashinfer' is unavailable: {reason}.")
        logger.info("Attention backend torch, not FlashInfer: %s", reason)
        return None
    return flashinfer_backend.FlashInferBackend(spec, device, module)
