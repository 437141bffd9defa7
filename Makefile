# Two entry points (README): `make demo` and `make test`. Both create what they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export LORALINE_HOME ?= $(CURDIR)/.loraline
# No telemetry from the libraries we drive: nothing leaves this machine.
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
DEMO := $(LORALINE_HOME)/demo
MODEL ?= smol-sql

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# torch==2.13.0 (CPU) is taken from the machine's wheel directory through pip's find-links.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

$(DEMO)/checkpoint-100/adapter_config.json: | setup
	$(BIN)/loraline demo init $(DEMO)

demo: setup $(DEMO)/checkpoint-100/adapter_config.json
	$(BIN)/loraline release --adapter $(DEMO)/checkpoint-100 --base $(DEMO)/base --name $(MODEL) --json | tee $(LORALINE_HOME)/last-release.json
	@echo
	@echo "Released. Where to look:"
	@echo "  lineage:    $(BIN)/loraline trace models:/$(MODEL)/1"
	@echo "  MLflow UI:  $(BIN)/mlflow ui --backend-store-uri sqlite:///$(LORALINE_HOME)/mlflow.db --host 127.0.0.1 --port 5000"
	@echo "  merged model and adapters: $(LORALINE_HOME)/merged/, $(LORALINE_HOME)/adapters/"

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/merge_bench.py

clean:
	rm -rf $(LORALINE_HOME)
