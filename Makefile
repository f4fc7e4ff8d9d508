# The two commands: `make run` and `make test`. Everything else is set up from here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINTED := corral tests bench $(wildcard examples)

.PHONY: run test test-repeat test-lower-bounds lint bench redis-server chromium promtool clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/corral run

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's redis-server"; \
	    (apt-get install -y -qq redis-server >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)); \
	  else \
	    echo "redis-server is missing: run 'sudo apt-get install redis-server' (Debian/Ubuntu)"; exit 1; \
	  fi; }

# The dashboard's browser test drives Debian's headless Chromium.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium"; \
	    (apt-get install -y -qq chromium >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)); \
	  else \
	    echo "chromium is missing: run 'sudo apt-get install chromium' (Debian/Ubuntu)"; exit 1; \
	  fi; }

# The metrics and alert rule tests check with promtool (Debian's prometheus package).
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's prometheus (for promtool)"; \
	    (apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null)); \
	  else \
	    echo "promtool is missing: run 'sudo apt-get install prometheus' (Debian/Ubuntu)"; exit 1; \
	  fi; }

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

test: $(STAMP) redis-server chromium promtool lint
	$(BIN)/pytest

# `make test-repeat N=5 [HOG=1]`: the suite N times in a row (with every core busy when
# HOG=1); lists every test that failed at least once.
N ?= 5
test-repeat: $(STAMP) redis-server chromium promtool
	$(BIN)/python -m tests.repeat $(N) $(if $(HOG),--hog)

# `make test-lower-bounds`: a fast subset of the tests in a fresh venv holding the lowest
# version of each dependency that setup.cfg allows (see tests/lower_bounds.py).
test-lower-bounds: $(STAMP) redis-server
	$(BIN)/python -m tests.lower_bounds

bench: $(STAMP) redis-server
	@for b in $(filter-out bench/_%,$(wildcard bench/*.py)); do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
