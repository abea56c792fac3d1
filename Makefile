# The two commands of the README: `make serve` (the main job) and `make test`. Both set up .venv first.
VENV  := .venv
GUARD := $(VENV)/bin/guard
PY    := $(VENV)/bin/python

.PHONY: setup serve prepare test test-fast anchors clean-venv

setup:
	@bash scripts/setup.sh

# Main job: set up, prepare the default model (convert, align, cache references, build the SafetyLock; cached
# after the first run) and start the guarded OpenAI-compatible server on 127.0.0.1:8000.
serve: setup
	@$(GUARD) prepare && exec $(GUARD) serve

prepare: setup
	@$(GUARD) prepare

test: setup
	@$(PY) -m pytest -q tests

test-fast: setup
	@$(PY) -m pytest -q -m "not integration" tests

# Regenerate the bundled anchor set from the deterministic splits (a test keeps them in step).
anchors: setup
	@$(PY) -m training.data

clean-venv:
	rm -rf $(VENV)
