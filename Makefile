# The two set-up commands: `make run` (embedded pipeline end to end) and `make test` (the suite).
# Both create .venv on first use and install the pinned requirements with plain pip.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= quick
CORES ?= 2
TEST_WORKERS ?= 2
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: run test venv data-deps slurm-deps clean-results gpu-check

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

# The suite on TEST_WORKERS processes (pytest-xdist); tests sharing one end-to-end run stay on one
# worker (tests/conftest.py: pytest_xdist_make_scheduler).
test: venv data-deps slurm-deps
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# The first-GPU check (one GPU, <= 8 min; run it once where a GPU is lent): the device tests on CUDA
# (incl. kill -9 + resume of a packed pro-vpt/pro-vpt-exact pair, fp32 and bf16), the GPU epoch benchmark
# (ViT-B/16 at 200/100/10 prompts per block, fp32/tf32/bf16, alone and packed; JSON for `provpt plan
# --measured`) and the vtab1k rehearsal on generated fixtures, each under its own time limit. Writes
# results/gpu-check/{gpu_epoch.json,*.log}; exits non-zero if a part failed or no GPU is visible.
GPU_CHECK := results/gpu-check
gpu-check:
	@test -x $(PY) || { echo "gpu-check: $(PY) not found: run 'make venv' first (or pass PY=/path/to/python)"; exit 2; }
	@$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || \
	  { echo "gpu-check: no CUDA GPU visible to torch on this machine; nothing was checked"; exit 1; }
	@mkdir -p $(GPU_CHECK); status=0; \
	echo "== device tests on CUDA (limit 150 s)"; \
	PROVPT_TEST_DEVICES=cuda timeout 150 $(PY) -m pytest -q -ra -p no:cacheprovider tests/test_device.py \
	  2>&1 | tee $(GPU_CHECK)/tests.log; test $${PIPESTATUS[0]} = 0 || status=1; \
	echo "== GPU epoch benchmark (limit 210 s, no record started after 150 s)"; \
	timeout 210 $(PY) benchmarks/gpu_epoch.py --device cuda --budget-s 150 --images 64 --prompts 200 100 10 \
	  --json $(GPU_CHECK)/gpu_epoch.json 2>&1 | tee $(GPU_CHECK)/gpu_epoch.log; test $${PIPESTATUS[0]} = 0 || status=1; \
	if [ -f tests/test_paper_profiles.py ]; then \
	  echo "== vtab1k rehearsal on generated fixtures, on CUDA (limit 120 s)"; \
	  PROVPT_TEST_DEVICE=cuda timeout 120 $(PY) -m pytest -q -ra -p no:cacheprovider tests/test_paper_profiles.py \
	    2>&1 | tee $(GPU_CHECK)/rehearsal.log; test $${PIPESTATUS[0]} = 0 || status=1; \
	else echo "== no tests/test_paper_profiles.py: rehearsal not run"; status=1; fi; \
	echo "gpu-check: $$( [ $$status = 0 ] && echo passed || echo FAILED ); logs and gpu_epoch.json in $(GPU_CHECK)/"; \
	exit $$status

clean-results:
	rm -rf results/$(PROFILE)
