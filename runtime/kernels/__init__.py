"""Native CPU kernels for what PyTorch's own ops do poorly, built on first use.

    build.py             compile a kernel's C source with the system compiler into a cache dir
    bf16_gemv.py         bfloat16 matmul for decode rows (AVX-512 BF16), via ctypes
    int8_gemv.py         INT8 weight-only matmul for decode rows (AVX-512 VNNI), via ctypes
    paged_attention.py   decode attention read from the paged KV cache (AVX-512), via ctypes
    rms_norm.py          HF's bf16 RMSNorm in one call instead of eight small ops

Each kernel is optional: without a compiler, on another ISA, or with
PINNACE_NATIVE_KERNELS=0 the callers keep PyTorch's path.
"""
