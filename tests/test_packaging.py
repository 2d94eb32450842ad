"""pyproject lists every package folder (the folder -> import-name mapping needs it)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPING = {"runtime": "pinnace.runtime", "operator": "pinnace.operator", "cli": "pinnace.cli"}


def test_every_package_folder_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {v: k for k, v in MAPPING.items()}
    found = set()
    for folder, name in MAPPING.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found == set(config["packages"])


def test_the_stdlib_operator_module_is_not_shadowed() -> None:
    import operator

    assert hasattr(operator, "itemgetter")
    import pinnace.operator

    assert Path(pinnace.operator.__file__).parent == ROOT / "operator"
