"""A torch reference of FlashInfer's paged-KV wrapper API, for running the FlashInfer
backend's glue (layout, page tables, planning, mixed steps) on CPU in CI.

Same constructor / plan / run signatures as flashinfer 0.6's
BatchPrefillWithPagedKVCacheWrapper and BatchDecodeWithPagedKVCacheWrapper (the arguments
the backend passes; the rest accepted and ignored), with scaled_dot_product_attention
inside. It checks what the real library needs of its caller: plan before run, int32 CSR
page tables, a query of plan's shape and dtype, a cache of plan's page size and kv dtype.

Semantics kept from FlashInfer: NHD paged cache [pages, 2, page_size, Hkv, D]; a request's
keys are its pages in indptr order, the last one filled to last_page_len; causal masks are
aligned bottom-right (query i of q_len sits at position kv_len - q_len + i); window_left
keeps keys at positions >= pos - window_left; logits_soft_cap caps scores as
cap * tanh(s / cap); k_scale / v_scale multiply the stored cache values.

Loaded by path (tests/runtime/conftest.py's `flashinfer_reference` fixture); as a module
it stands in for `import flashinfer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class _Plan:
    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    last_page_len: torch.Tensor
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    causal: bool
    sm_scale: float
    window_left: int
    logits_soft_cap: float | None
    q_data_type: torch.dtype
    kv_data_type: torch.dtype


def _check_csr(indptr: torch.Tensor, indices: torch.Tensor, last: torch.Tensor, page: int) -> None:
    for name, t in (("indptr", indptr), ("indices", indices), ("last_page_len", last)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    if int(indptr[-1]) != indices.numel() or indptr.numel() != last.numel() + 1:
        raise ValueError("indptr does not describe indices / last_page_len")
    if bool(((last < 1) | (last > page)).any()):
        raise ValueError("last_page_len must be in 1..page_size")


class _Wrapper:
    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD") -> None:
        if kv_layout != "NHD":
            raise NotImplementedError("the reference implements the NHD layout only")
        self.workspace = float_workspace_buffer
        self._plan: _Plan | None = None
        self.num_plans = 0

    def _set_plan(self, **kwargs: Any) -> None:
        kv_type = kwargs.pop("kv_data_type") or kwargs["q_data_type"]
        plan = _Plan(kv_data_type=kv_type, **kwargs)
        _check_csr(plan.kv_indptr, plan.kv_indices, plan.last_page_len, plan.page_size)
        if plan.num_qo_heads % plan.num_kv_heads:
            raise ValueError("num_qo_heads must be a multiple of num_kv_heads")
        self._plan = plan
        self.num_plans += 1

    def run(
        self,
        q: torch.Tensor,
        paged_kv_cache: torch.Tensor,
        *args: Any,
        k_scale: float | None = None,
        v_scale: float | None = None,
        out: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        p = self._plan
        if p is None:
            raise RuntimeError("plan() must be called before run()")
        num_q = int(p.qo_indptr[-1])
        if q.shape != (num_q, p.num_qo_heads, p.head_dim) or q.dtype != p.q_data_type:
            raise ValueError(f"q {tuple(q.shape)} {q.dtype} does not match the plan")
        cache = paged_kv_cache
        if cache.dim() != 5 or cache.shape[1:] != (2, p.page_size, p.num_kv_heads, p.head_dim):
            raise ValueError(f"cache {tuple(cache.shape)} is not NHD [pages, 2, page, Hkv, D]")
        if cache.dtype != p.kv_data_type:
            raise ValueError(f"cache dtype {cache.dtype} != planned {p.kv_data_type}")
        result = torch.empty_like(q) if out is None else out
        indptr, indices = p.kv_indptr.tolist(), p.kv_indices.tolist()
        for b in range(len(indptr) - 1):
            pages = indices[indptr[b] : indptr[b + 1]]
            kv_len = (len(pages) - 1) * p.page_size + int(p.last_page_len[b])
            lo, hi = int(p.qo_indptr[b]), int(p.qo_indptr[b + 1])
            # Through bytes: CPU indexing has no float8 kernel.
            kv = cache.view(torch.uint8)[pages].view(cache.dtype).float()  # [n, 2, page, Hkv, D]
            k = kv[:, 0].reshape(-1, p.num_kv_heads, p.head_dim)[:kv_len] * (k_scale or 1.0)
            v = kv[:, 1].reshape(-1, p.num_kv_heads, p.head_dim)[:kv_len] * (v_scale or 1.0)
            result[lo:hi] = self._attend(q[lo:hi].float(), k, v, kv_len).to(result.dtype)
        return result

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int
    ) -> torch.Tensor:
        """q: [Q, H, D], k/v: [L, Hkv, D] (float32) -> [Q, H, D]."""
        p = self._plan
        assert p is not None
        q_len = q.shape[0]
        q_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
        k_pos = torch.arange(kv_len)[None, :]
        allowed = k_pos <= q_pos if p.causal else torch.ones(q_len, kv_len, dtype=torch.bool)
        if p.window_left >= 0:
            allowed = allowed & (k_pos >= q_pos - p.window_left)
        group = p.num_qo_heads // p.num_kv_heads
        qh, kh = q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(group, 0)
        vh = v.transpose(0, 1).repeat_interleave(group, 0)  # [H, L, D]
        if p.logits_soft_cap:
            cap = p.logits_soft_cap
            scores = torch.tanh(qh @ kh.transpose(-1, -2) * p.sm_scale / cap) * cap
            scores = scores.masked_fill(~allowed, float("-inf"))
            o = torch.softmax(scores, dim=-1) @ vh
        else:
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=p.sm_scale)
        return o.transpose(0, 1)


class BatchPrefillWithPagedKVCacheWrapper(_Wrapper):
    def __init__(
        self,
        float_workspace_buffer: torch.Tensor,
        kv_layout: str = "NHD",
        use_cuda_graph: bool = False,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(float_workspace_buffer, kv_layout)

    def plan(
        self,
        qo_indptr: torch.Tensor,
        paged_kv_indptr: torch.Tensor,
        paged_kv_indices: torch.Tensor,
        paged_kv_last_page_len: torch.Tensor,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim_qk: int,
        page_size: int,
        head_dim_vo: int | None = None,
        custom_mask: torch.Tensor | None = None,
        packed_custom_mask: torch.Tensor | None = None,
        causal: bool = False,
        pos_encoding_mode: str = "NONE",
        use_fp16_qk_reduction: bool = False,
        sm_scale: float | None = None,
        window_left: int = -1,
        logits_soft_cap: float | None = None,
        rope_scale: float | None = None,
        rope_theta: float | None = None,
        q_data_type: torch.dtype = torch.float16,
        kv_data_type: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        if qo_indptr.dtype != torch.int32 or qo_indptr.numel() != paged_kv_indptr.numel():
            raise ValueError("qo_indptr must be int32 with one entry per kv_indptr entry")
        self._set_plan(
            qo_indptr=qo_indptr.cpu(), kv_indptr=paged_kv_indptr.cpu(),
            kv_indices=paged_kv_indices.cpu(), last_page_len=paged_kv_last_page_len.cpu(),
            num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim_qk,
            page_size=page_size, causal=causal, sm_scale=sm_scale or head_dim_qk**-0.5,
            window_left=window_left, logits_soft_cap=logits_soft_cap,
            q_data_type=q_data_type, kv_data_type=kv_data_type,
        )  # fmt: skip


class BatchDecodeWithPagedKVCacheWrapper(_Wrapper):
    def __init__(
        self,
        float_workspace_buffer: torch.Tensor,
        kv_layout: str = "NHD",
        use_cuda_graph: bool = False,
        use_tensor_cores: bool = False,
        paged_kv_indptr_buffer: torch.Tensor | None = None,
        paged_kv_indices_buffer: torch.Tensor | None = None,
        paged_kv_last_page_len_buffer: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(float_workspace_buffer, kv_layout)
        self.use_cuda_graph = use_cuda_graph
        self.buffers = (paged_kv_indptr_buffer, paged_kv_indices_buffer)
        self.last_page_len_buffer = paged_kv_last_page_len_buffer
        if use_cuda_graph and any(b is None for b in (*self.buffers, self.last_page_len_buffer)):
            raise ValueError("use_cuda_graph needs the three paged_kv buffers")

    def plan(
        self,
        indptr: torch.Tensor,
        indices: torch.Tensor,
        last_page_len: torch.Tensor,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        *deprecated_positional_args: Any,
        pos_encoding_mode: str = "NONE",
        window_left: int = -1,
        logits_soft_cap: float | None = None,
        q_data_type: torch.dtype = torch.float16,
        kv_data_type: torch.dtype | None = None,
        sm_scale: float | None = None,
        **kwargs: Any,
    ) -> None:
        if deprecated_positional_args:
            raise TypeError("pass plan()'s optional arguments by keyword")
        if self.use_cuda_graph:
            # Fixed batch size; the page table is copied into the caller's buffers.
            ind_buf, idx_buf = self.buffers
            assert ind_buf is not None and idx_buf is not None
            assert self.last_page_len_buffer is not None
            if indptr.numel() != ind_buf.numel() or indices.numel() > idx_buf.numel():
                raise ValueError("a CUDA-graph wrapper keeps its batch size; indices must fit")
            ind_buf.copy_(indptr)
            idx_buf[: indices.numel()].copy_(indices)
            self.last_page_len_buffer.copy_(last_page_len)
        self._set_plan(
            qo_indptr=torch.arange(indptr.numel(), dtype=torch.int32),
            kv_indptr=indptr.cpu(), kv_indices=indices.cpu(), last_page_len=last_page_len.cpu(),
            num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            page_size=page_size, causal=True, sm_scale=sm_scale or head_dim**-0.5,
            window_left=window_left, logits_soft_cap=logits_soft_cap,
            q_data_type=q_data_type, kv_data_type=kv_data_type,
        )  # fmt: skip
