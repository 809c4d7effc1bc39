# Two commands for a fresh machine; each first sets up whatever is missing (idempotent):
#   make up    - train if the model repository is empty, then serve both services and the web UI
#   make test  - the type check and the whole test suite (what CI runs)
#   make test-fast - the fast tier only (no Ray, no subprocess; under a minute): tests/fast
# The data root: a folder holding MNIST/raw/; on these machines ../shared/datasets.

VENV     ?= .venv
PY       := $(VENV)/bin/python
PIP      := $(VENV)/bin/pip
STAMP    := $(VENV)/.aevae-installed
export AEVAE_DATA_ROOT ?= $(abspath $(wildcard ../shared/datasets))

.PHONY: setup chromium up test test-fast typecheck proto bench clean container-tools images smoke-containers

setup: $(STAMP) chromium

# torch first, pinned to the build these machines carry on disk: unpinned, pip would fetch a multi-GB wheel.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

# The browser tests drive Debian's Chromium; install it when it is missing (needs root, as on CI).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

# The venv only: Chromium (apt-get, root) is for the browser tests, which `make up` does not run.
up: $(STAMP)
	$(VENV)/bin/aevae up

test: setup typecheck
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest tests/fast -q

# mypy on the installed aevae.* namespace, with the generated stubs (tools/typecheck.py links the tree).
typecheck: setup
	$(PY) tools/typecheck.py

# Regenerates the protobuf and gRPC code (and mypy stubs) from proto/; commit the result.
proto: setup
	$(PY) -m aevae.v1.generate

bench: setup
	$(PY) benchmarks/bench_training.py

clean:
	rm -rf $(VENV) build *.egg-info

# ---- containers (deploy/, docs/deploy.md) -------------------------------------------------------------------
# podman for the container smoke test, which `make test` runs: installed when missing, like chromium (root).
# runc: crun fails on these machines' hybrid cgroups; debootstrap: the base image without a registry.
container-tools:
	@command -v podman >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1 || { \
	  echo "installing Debian's podman for the container smoke test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc debootstrap; }

test: container-tools

# The images with podman or docker, whichever is there: IMAGES="trainer ray" for the torch targets.
IMAGES ?= encoder decoder ui
images:
	deploy/scripts/images.sh $(IMAGES)

# Build the lean images, run them with compose, round-trip through aevae.client, SIGTERM (see the script).
smoke-containers: setup container-tools
	$(PY) deploy/scripts/smoke_containers.py $(SMOKE_ARGS)
