"""The scheduling core is pure Python: importing it must not import torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Every module of pinnace.runtime.core (found by walking the package, so new ones are
# covered), plus the request and sampling-params modules the core is built on.
CHECK = """
import importlib, pkgutil, sys
import pinnace.runtime.core as core
names = [m.name for m in pkgutil.iter_modules(core.__path__, core.__name__ + ".")]
names += ["pinnace.runtime.request", "pinnace.runtime.sampling_params"]
for name in names:
    importlib.import_module(name)
assert len(names) >= 6, names
heavy = sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules)
print(" ".join(names))
sys.exit(f"imported {heavy}" if heavy else 0)
"""


def test_importing_the_scheduling_core_does_not_import_torch(tmp_path: Path):
    # A fresh interpreter (this one has torch loaded already), outside the repo root.
    proc = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "pinnace.runtime.core.scheduler" in proc.stdout
