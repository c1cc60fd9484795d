# Two commands do everything on a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PIP    := $(BIN)/pip --disable-pip-version-check --quiet

export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_SITE_CACHE_DIR ?= $(CURDIR)/.dvc/tmp/site
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install run demo ui browser pipeline-yaml kfp-run test test-fast lint format bench parity lock clean

install: $(STAMP)

# Installs exactly what requirements.lock pins, then the project itself (no dependency resolution).
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements.lock
	$(PIP) install --no-deps -e .
	touch $(STAMP)

run: $(STAMP)  ## the whole pipeline on the embedded default (dvc repro), then where to look
	$(BIN)/dvc repro
	$(BIN)/vilbert summary

demo: $(STAMP)  ## a few pretraining steps of the demo model (seconds)
	$(BIN)/vilbert model demo

# An `mlflow server` (webhooks need the server) with `vilbert registry listen` beside it: alias changes made in
# the UI are audited and keep previous-champion; `vilbert serve --tracking-uri http://127.0.0.1:5000` follows them.
ui: $(STAMP)  ## the MLflow UI on the local store (runs, pictures, registered models and aliases), promotions audited
	$(BIN)/vilbert registry ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000 \
	    --listen-port 5005

# Debian's chromium and chromium-driver, for the browser test (tests/components/test_registry_ui.py).
browser:  ## install headless Chromium and its WebDriver (apt; sudo when not root)
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
	    echo "chromium and chromedriver are installed"; \
	else \
	    sudo=$$(test "$$(id -u)" = 0 || echo "sudo -n"); \
	    $$sudo apt-get update && $$sudo apt-get install -y --no-install-recommends chromium chromium-driver; \
	fi

pipeline-yaml: $(STAMP)  ## recompile the committed Kubeflow IR YAML
	$(BIN)/python pipelines/full.py compile -o pipelines/full.yaml

kfp-run: $(STAMP)  ## the same pipeline under kfp.local
	$(BIN)/python pipelines/full.py run

test: $(STAMP)  ## every test (fast and slow), CPU only
	@$(MAKE) --no-print-directory browser || echo "chromium cannot be installed here: the browser test is skipped"
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
