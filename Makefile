# The two commands a new user needs: `make run` and `make test`. Both create .venv if it is
# missing and install the project into it; nothing else is required beyond Python 3.11+.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= etc/qoper8.toml
# Re-install when the project's metadata changes.
STAMP := $(VENV)/.installed

.PHONY: run test check lint typecheck format bench clean chromium redis redis-server

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25.1"

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[http]' --group test --group examples
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/qoper8d --config $(CONFIG)

test: $(STAMP) check chromium redis-server
	$(BIN)/python -m pytest -q

# The browser test drives Debian's chromium (Playwright's own download is not used); as root
# it is installed when missing. Without it that one test is skipped, saying why.
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && \
		{ apt-get -y install chromium || { apt-get update && apt-get -y install chromium; }; } \
		|| echo "chromium could not be installed: the browser test will be skipped"; }

# The cluster tests start real redis-servers of their own: Debian's, installed if missing
# (with sudo when not root).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
redis-server:
	@command -v redis-server >/dev/null || $(SUDO) apt-get -y install redis-server || \
		{ $(SUDO) apt-get update && $(SUDO) apt-get -y install redis-server; }

# A local Redis for `[cluster]` nodes (etc/node-a.toml, etc/node-b.toml), in the foreground:
# loopback only, its append-only file in .redis/ so that accepted work survives a restart.
redis: redis-server
	mkdir -p .redis
	redis-server --bind 127.0.0.1 --port 6379 --dir $(CURDIR)/.redis --appendonly yes --save ""

check: lint typecheck

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

$(VENV)/.bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e . --group bench
	touch $@

bench: $(VENV)/.bench
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
