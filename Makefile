# Two commands do everything on a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PIP    := $(BIN)/pip --disable-pip-version-check --quiet

export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install run test test-fast lint format bench parity lock clean

install: $(STAMP)

# Installs exactly what requirements.lock pins, then the project itself (no dependency resolution).
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements.lock
	$(PIP) install --no-deps -e .
	touch $(STAMP)

run: $(STAMP)  ## the main job on the embedded default
	$(BIN)/vilbert run

test: $(STAMP)  ## every test (fast and slow), CPU only
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not e2e"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)  ## training throughput and memory (see benchmarks/RESULTS.md)
	$(BIN)/vilbert model bench --preset demo
	$(BIN)/vilbert model bench --preset paper-base --batch-size 4 --steps 3

parity: $(STAMP)  ## numerical parity with the original ViLBERT on the reference vectors
	$(BIN)/vilbert model parity

# Regenerate the lock from the current environment (after changing dependencies in pyproject.toml).
lock:
	$(BIN)/pip freeze --exclude-editable | grep -v '^-e ' > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
