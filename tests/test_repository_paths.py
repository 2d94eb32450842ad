"""No tracked file names a folder of one machine: tests reach shared data as `../shared/data`
relative to the repository, scripts take folders as arguments or variables."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Home and workspace folders of developer machines and CI runners. Container paths the
# image defines itself (/models, /opt/venv, /var/cache/...) are not machine paths.
MACHINE_PATHS = re.compile(
    r"(?<![\w.~-])("
    r"/work/[\w.-]+"  # this workplace's checkouts, shared data and venvs
    r"|/root/[\w.-]+"
    r"|/home/[\w.-]+/"
    r"|/Users/[\w.-]+/"
    r"|/tmp/pytest-of-"
    r"|/opt/(?:pypi|wheels)\b"  # local package mirrors of one machine
    r"|[A-Za-z]:\\\\Users\\\\"
    r")"
)


def tracked_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_machine_paths_in_tracked_files() -> None:
    here = Path(__file__).resolve()
    checkout = str(ROOT.parent)  # wherever this clone lives, plus the known folders above
    found = []
    files = tracked_files()
    assert len(files) > 100
    for path in files:
        if path == here or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary test data
        for lineno, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATHS.search(line) or (len(checkout) > 1 and checkout + "/" in line):
                found.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not found, "absolute machine paths in tracked files:\n" + "\n".join(found)


def test_the_pattern_catches_machine_paths() -> None:
    for line in [
        'SPEC = Path("/work/shared/data/x.yaml")',
        "cd /root/project",
        "/home/alice/venv/bin/python",
        "pip install x --find-links /opt/wheels",
    ]:
        assert MACHINE_PATHS.search(line), line
    for line in ["COPY . /opt/venv/src", "--model /models/x.gguf", "a/work/b", "~/work/x"]:
        assert not MACHINE_PATHS.search(line), line
