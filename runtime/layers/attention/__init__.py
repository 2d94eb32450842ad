"""Attention: the layer models call, and the backends that own the paged KV layout.

layer.py            Attention (nn.Module): reads the step's backend from the forward context
backend.py          AttentionBackend, its metadata builder, BatchLayout, AttentionSpec
torch_backend.py    portable torch backend (SDPA / matmul over gathered blocks)
cpu_backend.py      the torch backend with decode read in place by a native CPU kernel
fp8_kv.py           scaled e4m3 KV storage, written and read by the backends above
selector.py         --attention-backend -> a backend instance
"""

from pinnace.runtime.layers.attention.backend import (
    AttentionBackend,
    AttentionMetadataBuilder,
    AttentionSpec,
    BatchLayout,
    LayerParams,
)
from pinnace.runtime.layers.attention.layer import Attention
from pinnace.runtime.layers.attention.selector import get_attention_backend

__all__ = [
    "Attention",
    "AttentionBackend",
    "AttentionMetadataBuilder",
    "AttentionSpec",
    "BatchLayout",
    "LayerParams",
    "get_attention_backend",
]
