# The two commands a newcomer needs: `make run` and `make test`. Both install what they need,
# uv included (with pip, when it is missing).
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := $(PYTHON) -m uv
endif
HOST ?= 127.0.0.1
PORT ?= 7860
# The project's environment, where `make run` installs a bot's BOT_REQUIREMENTS.
VENV := $(or $(UV_PROJECT_ENVIRONMENT),.venv)

.PHONY: run test quick sync uv lint web

uv:
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv

sync: uv
	$(UV) sync --locked

# Logs for a terminal here (LOG_FORMAT=json for the service's JSON lines). A team's bot runs
# as the local bots (they inherit BOT_ENTRYPOINT), its requirements installed first on top of
# the locked packages, which they may not change (as in the bot image); see bots/README.md:
#   BOT_ENTRYPOINT=bots/mybot/bot.py BOT_REQUIREMENTS=bots/mybot/requirements.txt make run
# The sync is inexact, so that it keeps those extra packages. The installs are quiet (their
# errors still show), so that the first screen is where to open the page. The dispatcher is
# exec'd: no shell stands between make and it, so that Ctrl-C ends it, and `make run` with
# it, quietly (it exits 0 after ending its bots); see "The command line" in docs/operations.md.
run: uv
	@$(UV) sync --quiet --locked --inexact
ifdef BOT_REQUIREMENTS
	@$(UV) export --frozen --quiet --no-hashes --no-emit-project -o $(VENV)/locked.txt
	@$(UV) pip install --quiet --python $(VENV)/bin/python -c $(VENV)/locked.txt -r $(BOT_REQUIREMENTS)
endif
	@LOG_FORMAT=$${LOG_FORMAT:-text} exec $(UV) run --no-sync dispatcher serve --host $(HOST) --port $(PORT)

lint: sync
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run mypy

# Every test (CI runs this): most on PYTEST_WORKERS xdist workers, those whose module-scoped
# fixtures are costly on one worker each (xdist_group, hence --dist loadgroup); then, in one
# process, the browser tests (their page timeouts want the machine) and the `serial` ones.
# Both passes run; the target fails if either did. Four workers on two cores: most tests wait
# on processes and sockets, not the CPU (docs/testing.md has the figures).
PYTEST_WORKERS ?= 4
test: lint
	status=0; \
	$(UV) run pytest -n $(PYTEST_WORKERS) --dist loadgroup -m "not browser and not serial" || status=$$?; \
	$(UV) run pytest -m "browser or serial" || status=$$?; \
	exit $$status

# The inner loop: every test but the slow, browser and image-replay ones (pytest markers),
# without lint, on four workers (most tests wait on processes and sockets, not the CPU).
quick: sync
	$(UV) run pytest -n 4 --dist loadgroup -m "not slow and not browser and not image"

# Rebuilds the web page into dispatcher/web/ (committed, so `make run` needs no npm). Only for
# changes under web/: tests/test_web_assets.py fails when the committed build is stale.
web:
	cd web && npm ci --no-audit --no-fund && npm run build
