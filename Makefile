# Two commands set everything up on a fresh clone: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-unit bench gpu-check clean cluster-up cluster-down

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(PY) requirements.txt pyproject.toml
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -r requirements.txt
	$(PY) -m pip install -qq --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m pipelines.pretrain --config pipelines/configs/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q

test-unit: $(STAMP)
	$(PY) -m pytest -q -m unit

bench: $(STAMP)
	$(PY) -m pipelines.benchmark loss
	$(PY) -m pipelines.benchmark augment
	$(PY) -m pipelines.benchmark train

# Torch-only (no Ray, MLflow or install needed): runs with the GPU machine's own python3, from the
# repository root. Loss correctness on the device (tests/device_checks.py, which tests/sscl/losses/test_device_losses.py
# also runs), then loss, augmentation and training-step timings.
GPU_PYTHON ?= python3

gpu-check:
	$(GPU_PYTHON) -m pipelines.gpu_check --device cuda

clean:
	rm -rf $(VENV) build *.egg-info

# A Ray head and an MLflow server on 127.0.0.1 for trying `ray job submit` (README, "On a cluster").
cluster-up: $(STAMP)
	$(PY) -m pipelines.local_cluster up

cluster-down: $(STAMP)
	$(PY) -m pipelines.local_cluster down
