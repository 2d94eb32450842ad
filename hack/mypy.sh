#!/usr/bin/env bash
# mypy cannot follow setuptools' folder -> module mapping (runtime/ -> pinnace.runtime),
# so type-check a tree of links laid out under the import names.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/typecheck
rm -rf "$tree" && mkdir -p "$tree/pinnace"
for pkg in runtime operator cli; do ln -s "../../../$pkg" "$tree/pinnace/$pkg"; done
cd "$tree"
exec "../../${VENV:-.venv}/bin/mypy" --explicit-package-bases -p pinnace.runtime -p pinnace.operator -p pinnace.cli --config-file ../../pyproject.toml
