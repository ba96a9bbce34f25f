# The two commands a new user needs: `make run` and `make test`. Both set everything up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
REPO ?= model_repository
DATA ?= data
EPOCHS ?= 3
PRECISION ?= fp32
PROTOS := $(wildcard proto/wire/*.proto)
# The GPU check (docs/benchmarks.md#gpu): the wheels the GPU machine lacks, for its Python, and
# the folder its results go to. Its Python is the machine's own (no venv there).
GPU_WHEELS ?= gpu-wheels
GPU_PYTHON_VERSION ?= 3.12
GPU_PLATFORMS ?= manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64
GPU_OUT ?= gpu-results
GPU_ARGS ?=
GENERATED := $(patsubst proto/wire/%.proto,wire/%_pb2.py,$(PROTOS))

.PHONY: install proto run repository test lint format bench clean help test-tools docker-engine perf-analyzer \
	gpu-wheels gpu-check

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "grpcio-tools==1.81.1"
	$(MAKE) --no-print-directory proto
	$(PIP) install --quiet -e ".[train,torchscript,dev]"
	@touch $@

install: $(STAMP)  ## create .venv and install the server, training and test dependencies

proto: $(GENERATED)  ## generate the Python protobuf/gRPC code from proto/

wire/%_pb2.py: proto/wire/%.proto
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $<

repository: $(STAMP) proto  ## train and export the FashionMNIST and CIFAR10 models into $(REPO) (PRECISION=fp32|fp16|int8)
	$(PY) -m training build-repository --model-repository $(REPO) --data-dir $(DATA) --epochs $(EPOCHS) --precision $(PRECISION)

run: repository  ## the main job: build the model repository, then serve it
	$(PY) -m server --model-repository $(REPO)

test: $(STAMP) proto test-tools docker-engine perf-analyzer  ## install if needed, then lint and run the whole test suite
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

# The deployment tests run Prometheus and promtool (Debian's `prometheus` package; apt does not
# start it); the workers benchmark's test runs h2load (Debian's `nghttp2-client`). Installed
# when missing and we are root; otherwise those tests skip, saying why (under CI=true they
# fail instead).
test-tools:  ## install prometheus, promtool and h2load with apt-get when missing (needs root)
	@missing=""; \
	command -v prometheus >/dev/null && command -v promtool >/dev/null || missing="prometheus"; \
	command -v h2load >/dev/null || missing="$$missing nghttp2-client"; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "not installed (and not root with apt-get): $$missing; the tests that need them will skip"; \
	else \
		echo "installing with apt-get:$$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq --no-install-recommends $$missing >/dev/null 2>&1 \
		|| { apt-get update -qq >/dev/null 2>&1 \
			&& apt-get install -y -qq --no-install-recommends $$missing >/dev/null; } \
		|| echo "apt-get could not install$$missing: the tests that need them will skip"; \
	fi

# The container tests build the images and run them and the compose stack on a Docker engine.
# deploy/ci/prepare-docker.sh uses the engine that answers, or (as root, with apt-get) installs
# Debian's and starts it, and stands in base images that no registry serves. When it cannot,
# the container tests skip, saying why (under CI=true they fail instead).
docker-engine:  ## prepare a Docker engine and the base images for the container tests
	@deploy/ci/prepare-docker.sh || echo "no Docker engine prepared: the container tests will skip"

# Triton's load generator, run by tests/test_perf_analyzer.py against the server over gRPC and
# HTTP: its binary from PyPI needs a newer glibc than Debian bookworm's, so it runs under Debian
# trixie's loader and libraries, unpacked into $(VENV)/perf-analyzer (the system is untouched).
perf-analyzer: $(STAMP)  ## fetch perf_analyzer into .venv/perf-analyzer (run it: .venv/perf-analyzer/perf_analyzer)
	@deploy/ci/prepare-perf-analyzer.sh $(VENV)/perf-analyzer >/dev/null \
		|| echo "perf_analyzer could not be prepared: its tests will skip"

lint: $(STAMP)  ## ruff check and format check
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(PY) -m ruff check --fix . && $(PY) -m ruff format .

bench: $(STAMP) proto  ## served path vs compute and transport ceilings on $(REPO) (run `make repository` first)
	$(PY) -m benchmarks --model-repository $(REPO) --model fashion_mnist --out benchmark-results/fashion_mnist
	$(PY) -m benchmarks --model-repository $(REPO) --model cifar10 --out benchmark-results/cifar10

# Run here: the packages benchmarks.gpu.wheels names (pinned as pyproject.toml pins them), as
# wheels for the GPU machine's Python on manylinux x86-64, checked for their tags and size.
gpu-wheels: $(STAMP)  ## download the wheels the GPU machine lacks into gpu-wheels/ (for its Python 3.12)
	rm -rf $(GPU_WHEELS)
	$(PIP) download --quiet --no-deps --only-binary=:all: --dest $(GPU_WHEELS) \
		--python-version $(GPU_PYTHON_VERSION) $(addprefix --platform ,$(GPU_PLATFORMS)) \
		$$($(PY) -m benchmarks.gpu.wheels requirements)
	$(PY) -m benchmarks.gpu.wheels check $(GPU_WHEELS) --python-version $(GPU_PYTHON_VERSION)

# Run on the GPU machine, with gpu-wheels/ and wire/ copied along (no venv, no proto step there).
gpu-check:  ## on a GPU machine: the GPU path in one bounded run (8 min), results in gpu-results/
	$(PYTHON) -m benchmarks gpu --out $(GPU_OUT) --wheels $(GPU_WHEELS) $(GPU_ARGS)

clean:  ## remove the generated code and build output (keeps .venv and data)
	rm -f wire/*_pb2*.py wire/*_pb2*.pyi
	rm -rf build *.egg-info .pytest_cache
