# mlflowctl developer / CI entry points.
#
#   make demo       set up (venv + data) and run the pipeline, then list models
#   make test       set up (venv + data + docker) and run the test suite
#   make bench      set up (venv + data) and run the benchmarks
#   make venv|data|docker|seaweedfs|cluster   the individual set-up steps (idempotent, fast when done)
#   make cluster    build (once, cached) and start the single-node test Kubernetes (tests/cluster/)
#   make argo       the Argo Workflows controller (3.6, from its Go module) beside it, its executor image
#   make cluster-down  stop it, leaving no process, mount, link, iptables rule or sysctl behind
#   make clean      remove pipeline state (.mlflowctl/)
#   make distclean  also remove the virtualenv (.venv/)
#
# Variables: PYTHON (interpreter for the venv, default python3), PYTEST_ARGS,
# DOIT_ARGS, NO_DOCKER=1 (make test without starting Docker), NO_CLUSTER=1 (make test without
# the test Kubernetes: its tests then skip, or fail under CI=true), BASE_IMAGE.
# NO_SEAWEEDFS=1 (make test without building SeaweedFS: its S3 tests are skipped).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON      ?= python3
VENV        := .venv
VBIN        := $(VENV)/bin
PIP         := $(VBIN)/python -m pip
# The serving targets shipped as distributions of their own (each registers through the mlflowctl
# entry-point group, like a third-party plugin): installed editable into the venv.
TARGET_PLUGINS := plugins/tfserving plugins/seldon plugins/hydrosphere
# Re-install when any of these change (only those that exist).
INSTALL_DEPS := $(wildcard setup.py setup.cfg pyproject.toml image/requirements.txt image/requirements-nodeps.txt) \
                $(wildcard $(addsuffix /pyproject.toml,$(TARGET_PLUGINS)))
STAMP       := $(VENV)/.mlflowctl-install.stamp

FMNIST_DIR  ?= /usr/share/datasets/fashion-mnist
FMNIST_FILE := $(FMNIST_DIR)/train-images-idx3-ubyte.gz
FMNIST_PKG  := dataset-fashion-mnist

PYTEST_ARGS ?=
DOIT_ARGS   ?=
NO_DOCKER   ?=
NO_CLUSTER  ?=
NO_SEAWEEDFS ?=

export DEBIAN_FRONTEND := noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK := 1


.PHONY: help venv data docker seaweedfs cluster tfjob-operator argo cluster-down demo test bench clean distclean

help:
	@echo "targets: demo test bench venv data docker seaweedfs cluster cluster-down clean distclean"
	@echo "  e.g. make test PYTEST_ARGS='-k local -x'"

# ---------------------------------------------------------------- venv
venv: $(STAMP)

$(VBIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "venv: ERROR: $(PYTHON) not found; install Python 3.11 or pass PYTHON=/path/to/python3.11" >&2; exit 1; }
	@echo "venv: creating $(VENV) with $$($(PYTHON) --version 2>&1)"
	$(PYTHON) -m venv $(VENV)

# An existing .venv without the stamp is reused: we just (re)install into it.
$(STAMP): $(INSTALL_DEPS) | $(VBIN)/python
	@for f in setup.py image/requirements.txt image/requirements-nodeps.txt; do \
	  [ -f "$$f" ] || { echo "venv: ERROR: $$f is missing; run make from the repository root of a complete checkout" >&2; exit 1; }; \
	done
	@echo "venv: installing mlflowctl[test] and image/requirements.txt into $(VENV) (slow the first time)"
	$(PIP) install -q --upgrade pip 'setuptools>=70' wheel
	$(PIP) install -q -e '.[test]' -r image/requirements.txt
	@# tensorflow-serving-api would pull the full tensorflow next to tensorflow-cpu: its needs are in requirements.txt
	$(PIP) install -q --no-deps -r image/requirements-nodeps.txt
	$(PIP) install -q $(foreach p,$(TARGET_PLUGINS),-e $(p))
	@touch $@
	@echo "venv: ready"

# ---------------------------------------------------------------- data
# Fashion-MNIST from Debian's dataset-fashion-mnist package. Without apt the
# pipeline's data stage falls back to downloading it.
data:
	@if [ -f "$(FMNIST_FILE)" ]; then \
	  echo "data: Fashion-MNIST present in $(FMNIST_DIR)"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "data: NOTE: $(FMNIST_FILE) missing and no apt-get; the data stage will download Fashion-MNIST instead"; \
	else \
	  if [ "$$(id -u)" -eq 0 ]; then sudo=""; \
	  elif command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; \
	  else echo "data: NOTE: not root and no sudo, cannot apt-get install $(FMNIST_PKG); the data stage will download Fashion-MNIST instead"; exit 0; fi; \
	  apt="$$sudo apt-get -y -q -o DPkg::Lock::Timeout=300"; log="$$(mktemp -t mlflowctl-apt-data.XXXXXX)"; \
	  echo "data: installing $(FMNIST_PKG) with apt-get"; \
	  if ! $$apt install --no-install-recommends $(FMNIST_PKG) >$$log 2>&1; then \
	    echo "data: apt-get install failed; running apt-get update and retrying"; \
	    $$apt update >>$$log 2>&1 || true; \
	    $$apt install --no-install-recommends $(FMNIST_PKG) >>$$log 2>&1 || true; \
	  fi; \
	  if [ -f "$(FMNIST_FILE)" ]; then echo "data: Fashion-MNIST installed in $(FMNIST_DIR)"; \
	  else tail -n 5 $$log >&2 || true; \
	    echo "data: WARNING: could not install $(FMNIST_PKG) (log $$log); the data stage will try to download Fashion-MNIST instead" >&2; fi; \
	fi

# ---------------------------------------------------------------- docker
docker:
	@if [ -n "$(NO_DOCKER)" ]; then echo "docker: skipped (NO_DOCKER set)"; exit 0; fi; \
	scripts/ensure-docker.sh && scripts/ensure-base-image.sh

# ---------------------------------------------------------------- cluster
# A real single-node Kubernetes (upstream v1.34 built from its Go modules) for the k8s tests.
cluster:
	@if [ -n "$(NO_CLUSTER)" ]; then echo "cluster: skipped (NO_CLUSTER set)"; exit 0; fi; \
	scripts/ensure-cluster.sh up

# the Kubeflow training operator (TFJob scheme) beside the test cluster: built once from its Go module
tfjob-operator: cluster
	@if [ -n "$(NO_CLUSTER)" ]; then echo "tfjob-operator: skipped (NO_CLUSTER set)"; exit 0; fi; \
	scripts/ensure-tfjob-operator.sh up

# the Argo Workflows 3.6 controller beside the test cluster and its executor image: built once from the Go module
# (the Workflow CRD's full schema, which tests/test_argo.py validates `mlflowctl export argo` against, comes with it)
argo: cluster docker
	@if [ -n "$(NO_CLUSTER)" ]; then echo "argo: skipped (NO_CLUSTER set)"; exit 0; fi; \
	scripts/ensure-argo.sh up

cluster-down:
	scripts/ensure-cluster.sh down

# ---------------------------------------------------------------- seaweedfs
# A second S3 server for the store contract tests, built from its Go module
# (optional on a workstation: without Go, or if the build fails, those tests are skipped; under CI that
# fails). Built once per version into /var/cache/mlflowctl/seaweedfs, linked as .cache/seaweedfs/weed.
seaweedfs:
	@if [ -n "$(NO_SEAWEEDFS)" ]; then echo "seaweedfs: skipped (NO_SEAWEEDFS set)"; exit 0; fi; \
	scripts/build-seaweedfs.sh

# ---------------------------------------------------------------- seldon
# The REAL Seldon Core v1 Python wrapper (seldon-core-microservice, BSL: optional) for the seldon serving
# target, in an environment of its own: its pins (protobuf<4, numpy<2, ...) clash with TensorFlow 2.21,
# so the model class loads SavedModels with tensorflow-cpu 2.15 there. `make test` depends on it.
SELDON_VENV := .venv-seldon
SELDON_PKGS := seldon-core==1.18.2 tensorflow-cpu==2.15.1 'setuptools<81'
.PHONY: seldon
test: seldon
seldon: $(SELDON_VENV)/.mlflowctl-seldon.stamp
$(SELDON_VENV)/.mlflowctl-seldon.stamp:
	@echo "seldon: installing $(SELDON_PKGS) into $(SELDON_VENV) (slow the first time)"
	$(PYTHON) -m venv $(SELDON_VENV)
	$(SELDON_VENV)/bin/python -m pip install -q --upgrade pip wheel 'setuptools<81'
	PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python $(SELDON_VENV)/bin/python -m pip install -q $(SELDON_PKGS)
	@touch $@
	@echo "seldon: $(SELDON_VENV)/bin/seldon-core-microservice ready"

# The SeldonDeployment CRD for the test cluster (the operator itself cannot be built or run here): from
# Seldon Core's operator Go module (v1.14.0 is the newest the Go module proxy serves; not in the checksum
# database, hence GONOSUMDB), with its kustomize patch of the graph's schema (graph_children.yaml).
# tests/test_seldon_k8s.py installs it into the cluster.
SELDON_OPERATOR := github.com/seldonio/seldon-core/operator@v1.14.0
SELDON_CRD := .cache/seldon/machinelearning.seldon.io_seldondeployments.yaml
SELDON_CRD_PATCH := .cache/seldon/graph_children.yaml
.PHONY: seldon-crd
test: seldon-crd
seldon-crd: $(SELDON_CRD)
$(SELDON_CRD):
	@if ! command -v go >/dev/null 2>&1; then echo "seldon-crd: no Go toolchain; the Seldon k8s tests will be skipped"; exit 0; fi; \
	mkdir -p $(dir $(SELDON_CRD)); \
	dir=$$(GONOSUMDB=github.com/seldonio/seldon-core GOFLAGS=-mod=mod GOMODCACHE=$${GOMODCACHE:-/var/cache/mlflowctl/go/mod} \
	       go mod download -json $(SELDON_OPERATOR) | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$$/\1/p'); \
	test -n "$$dir" || { echo "seldon-crd: go mod download $(SELDON_OPERATOR) failed" >&2; exit 1; }; \
	cp "$$dir/config/crd_v1_small/bases/machinelearning.seldon.io_seldondeployments.yaml" $(SELDON_CRD).tmp; chmod 644 $(SELDON_CRD).tmp; \
	cp "$$dir/config/crd_v1_small/patches/graph_children.yaml" $(SELDON_CRD_PATCH); chmod 644 $(SELDON_CRD_PATCH); \
	mv $(SELDON_CRD).tmp $(SELDON_CRD); echo "seldon-crd: $(SELDON_CRD) from $(SELDON_OPERATOR)"

# ---------------------------------------------------------------- main targets
demo: venv data
	$(VBIN)/doit -n 2 $(DOIT_ARGS)
	$(VBIN)/mlflowctl models
	$(VBIN)/mlflowctl report

test: venv data docker seaweedfs cluster argo
	$(VBIN)/pytest -q -ra tests $(PYTEST_ARGS)

bench: venv data
	$(VBIN)/python bench/run_all.py

# ---------------------------------------------------------------- browser
# Debian's chromium (and a font) for the browser tests of `mlflowctl ui`, driven by
# Playwright from PyPI with executable_path=$(CHROMIUM): no browser is ever downloaded.
# `make test` depends on it (the extra prerequisite line below).
CHROMIUM ?= /usr/bin/chromium
BROWSER_PKGS := chromium fonts-dejavu-core
export MLFLOWCTL_CHROMIUM := $(CHROMIUM)

.PHONY: browser
test: browser
browser:
	@if [ -x "$(CHROMIUM)" ]; then echo "browser: $$($(CHROMIUM) --version 2>/dev/null | head -n 1) at $(CHROMIUM)"; exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then echo "browser: ERROR: $(CHROMIUM) missing and no apt-get; install Chromium and pass CHROMIUM=/path" >&2; exit 1; fi; \
	if [ "$$(id -u)" -eq 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; \
	else echo "browser: ERROR: not root and no sudo, cannot apt-get install $(BROWSER_PKGS)" >&2; exit 1; fi; \
	apt="$$sudo apt-get -y -q -o DPkg::Lock::Timeout=300"; log="$$(mktemp -t mlflowctl-apt-browser.XXXXXX)"; \
	echo "browser: installing $(BROWSER_PKGS) with apt-get"; \
	if ! $$apt install --no-install-recommends $(BROWSER_PKGS) >$$log 2>&1; then \
	  echo "browser: apt-get install failed; running apt-get update and retrying"; \
	  $$apt update >>$$log 2>&1 || true; \
	  $$apt install --no-install-recommends $(BROWSER_PKGS) >>$$log 2>&1 || true; \
	fi; \
	if [ -x "$(CHROMIUM)" ]; then echo "browser: $$($(CHROMIUM) --version 2>/dev/null | head -n 1) installed"; \
	else tail -n 5 $$log >&2 || true; echo "browser: ERROR: could not install chromium (log $$log)" >&2; exit 1; fi

# ---------------------------------------------------------------- cleaning
clean:
	rm -rf .mlflowctl

distclean: clean
	rm -rf $(VENV) build *.egg-info .pytest_cache
