# The two commands a newcomer needs: `make run` and `make test`. Both install what they need,
# uv included (with pip, when it is missing).
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := $(PYTHON) -m uv
endif
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: run test sync uv lint web

uv:
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv

sync: uv
	$(UV) sync --locked

# Logs for a terminal here (LOG_FORMAT=json for the service's JSON lines).
run: sync
	LOG_FORMAT=$${LOG_FORMAT:-text} $(UV) run dispatcher serve --host $(HOST) --port $(PORT)

lint: sync
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run mypy

test: lint
	$(UV) run pytest

# Rebuilds the web page into dispatcher/web/ (committed, so `make run` needs no npm). Only for
# changes under web/: tests/test_web_assets.py fails when the committed build is stale.
web:
	cd web && npm ci --no-audit --no-fund && npm run build
