# The two set-up commands: `make run` (embedded pipeline end to end) and `make test` (the suite).
# Both create .venv on first use and install the pinned requirements with plain pip.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= quick
CORES ?= 2
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: run test venv data-deps slurm-deps clean-results

$(VENV)/.installed: requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $@

venv: $(VENV)/.installed

# Fashion-MNIST (Debian package dataset-fashion-mnist) is the embedded profile's upstream data.
data-deps:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)); \
	  elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
	    sudo apt-get install -y -qq dataset-fashion-mnist; \
	  fi; \
	fi
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST not found in $(FMNIST_DIR)."; \
	  echo "Install the Debian package 'dataset-fashion-mnist', or copy the four IDX .gz files"; \
	  echo "(train/t10k images/labels) into a folder and run: make run FMNIST_DIR=/that/folder"; \
	  exit 1; \
	fi

# Debian's slurm-wlm and munge, for the suite's single-node SLURM test (it starts and stops its own
# daemons). Installed when this runs as root with apt; elsewhere that one test is skipped (CI sets
# PROVPT_REQUIRE_SLURM=1, so there it fails instead).
slurm-deps:
	@if ! command -v slurmctld >/dev/null && ! [ -x /usr/sbin/slurmctld ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null || \
	   (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null)); \
	fi

run: venv data-deps
	$(VENV)/bin/snakemake --cores $(CORES) --config profile=$(PROFILE) fmnist_dir=$(FMNIST_DIR)
	$(VENV)/bin/snakemake --config profile=$(PROFILE) fmnist_dir=$(FMNIST_DIR) --report results/$(PROFILE)/report.html

test: venv data-deps slurm-deps
	$(PY) -m pytest -q

clean-results:
	rm -rf results/$(PROFILE)
