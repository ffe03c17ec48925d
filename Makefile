# Two commands: `make demo` and `make test`. Both set up what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build; on this platform pip finds it on local disk. Never let a bare
# `torch` requirement pull the multi-GB CUDA build onto a CPU machine.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup test demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" numpy
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

test: setup
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		echo "NOTE: chromium or chromedriver is not installed: the dashboard's browser tests" \
		     "(tests/test_dashboard_browser.py) will be SKIPPED (apt-get install -y chromium chromium-driver)"
	$(PY) -m pytest $(PYTEST_ARGS)

# The chaos demo: train 2 DDP ranks on CPU, inject kill -9 / SIGSTOP / a hang /
# a crash mid-checkpoint, run again without faults, compare the final weights.
demo: setup
	$(VENV)/bin/rankwarden chaos

# Every benchmark, side by side with its baseline; writes bench/RESULTS.md (~14 minutes).
bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) rankwarden-jobs .pytest_cache
