"""Compile a C kernel shipped as source into a shared library, once, and load it.

The library is cached under PINNACE_KERNEL_CACHE (default ~/.cache/pinnace/kernels) by a
hash of the source and flags, so a source change rebuilds and a read-only cache
that already holds the build (a container image) is only read. The sources target ISA
extensions with pragmas rather than -march=native, so a build runs on any CPU that has
them; callers check the CPU before loading.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp")
# the <name>.c files next to this one
KERNELS = (
    "bf16_gemv",
    "int8_digits",
    "int8_gemv",
    "llama_decode",
    "paged_decode_attention",
    "rms_norm",
)
COMPILE_TIMEOUT_S = 120


def enabled() -> bool:
    return os.environ.get("PINNACE_NATIVE_KERNELS", "1").lower() not in ("0", "false", "no")


def cache_dir() -> Path:
    configured = os.environ.get("PINNACE_KERNEL_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pinnace" / "kernels"


def compiler() -> str | None:
    """The C compiler kernels are built with: $CC, else cc or gcc on PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_for_cpu(name: str, required_flags: tuple[str, ...]) -> ctypes.CDLL | None:
    """load(name) where enabled and the CPU has `required_flags`; otherwise None (logged)."""
    if not enabled():
        return None
    missing = [flag for flag in required_flags if flag not in cpu_flags()]
    if missing:
        logger.info("native kernel %s needs CPU flags %s; using PyTorch's path", name, missing)
        return None
    return load(name)


def native_function(
    name: str,
    required_flags: tuple[str, ...],
    symbol: str,
    argtypes: list[type],
    restype: type | None,
) -> Any:
    """The C function `symbol` of kernel `name`, typed for ctypes (a ctypes function
    pointer); None where unavailable."""
    lib = load_for_cpu(name, required_flags)
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


def load(name: str) -> ctypes.CDLL | None:
    """The library built from `<name>.c` next to this file; None if it cannot be built."""
    source = Path(__file__).with_name(f"{name}.c")
    cc = compiler()
    key = hashlib.sha256(source.read_bytes() + " ".join(FLAGS).encode())
    target = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        try:
            return ctypes.CDLL(str(target))
        except OSError as err:  # truncated or foreign (an interrupted copy): build it again
            logger.warning("cached native kernel %s unusable (%s); rebuilding", name, err)
    if cc is None:
        logger.info("no C compiler found: native kernel %s not built", name)
        return None
    try:
        _compile(cc, source, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as err:
        logger.warning("native kernel %s not built (%s); using PyTorch's path", name, err)
        return None


def build_all() -> None:
    """Build every kernel into the cache (container images do this at build time)."""
    failed = [name for name in KERNELS if load(name) is None]
    if failed:
        raise RuntimeError(f"native kernels not built: {', '.join(failed)} (see the log)")


def _compile(compiler: str, source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *FLAGS, str(source), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            raise subprocess.SubprocessError(result.stderr.strip().splitlines()[-1:])
        os.replace(tmp, target)
        logger.info("built native kernel %s", target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
