# fednested: two commands matter — `make demo` and `make test`. Everything they need is installed into a cached
# virtualenv (scripts/venv.sh) and every service they use is started by scripts/services.sh.
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -euo pipefail -c

VENV = $(shell scripts/venv.sh dev)
PY = $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)
export PYTHONDONTWRITEBYTECODE := 1
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv test lint typecheck djangocheck pytest demo bench-edge bench-aggregate bench-async bench-federated bench-forgetting bench-api bench-ingest bench-tier1 services-start services-stop services-status clean

venv:
	@echo "virtualenv: $(VENV)"

lint:
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

typecheck:
	$(VENV)/bin/mypy

djangocheck:
	$(PY) manage.py check --fail-level WARNING
	$(PY) manage.py makemigrations --check --dry-run

# Starts PostgreSQL, Redis and Kafka on 127.0.0.1 (installing missing Debian packages first), runs every check
# against them, and stops them again — also when a check fails or the run is interrupted (the trap runs on any
# exit). Every stage runs even after one fails, so one lint error does not hide the test results; the summary at
# the end names the stages that failed.
test:
	@export FEDNESTED_SERVICES_ENV="$(CURDIR)/var/services/env.sh"
	# One intra-op thread per test process: on 2 shared cores, torch's default of a thread per core makes the
	# tiny models' steps many times slower (oversubscription), and the suite runs subprocesses side by side.
	export OMP_NUM_THREADS=1
	trap 'scripts/services.sh stop' EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	scripts/services.sh start
	source "$$FEDNESTED_SERVICES_ENV"
	venv=$$(scripts/venv.sh dev)
	failed=()
	stage() { local name=$$1; shift; echo "== make test: $$name" >&2; "$$@" || failed+=("$$name"); }
	stage lint $(MAKE) --no-print-directory lint
	stage typecheck $(MAKE) --no-print-directory typecheck
	stage "django check" "$$venv/bin/python" manage.py check --fail-level WARNING
	stage "migrations check" "$$venv/bin/python" manage.py makemigrations --check --dry-run
	stage pytest "$$venv/bin/python" -m pytest --ignore=tests/fednested/interop/test_flower.py $(PYTEST_ARGS)
	# Flower's pins conflict with the dev set's, so its test runs in a venv layered over the dev one
	# (requirements/flower.txt, docs/interop-flower.md).
	stage flower "$$(scripts/venv.sh flower)/bin/python" -m pytest -p no:cacheprovider tests/fednested/interop/test_flower.py
	if [ "$${#failed[@]}" -gt 0 ]; then
	  printf '== make test: FAILED: %s\n' "$${failed[*]}" >&2
	  exit 1
	fi
	echo "== make test: all stages passed" >&2

demo:
	$(PY) manage.py demo $(DEMO_ARGS)

bench-edge:
	$(PY) -m bench.edge

# Middle-loop aggregation: ours (factored, K-independent memory) against a Flower-style dense aggregate.
bench-aggregate:
	$(PY) -m bench.aggregate

# Asynchronous buffered aggregation against synchronous FedAvg on a simulated clock (tiny model, real training).
bench-async:
	$(PY) -m bench.asynchronous

# Federated edge LoRA against centralised LoRA on the same tokens: server optimisers, robust rules under poisoning,
# DP at ε 1/4/8 (tiny model, real training, 3 seeds; docs/benchmarks/federated.md).
bench-federated:
	$(PY) -m bench.federated

# Anti-forgetting safeguards (EWC, distillation, freezing, combined) on sequential and federated domain updates
# (tiny model, real training, 3 seeds; docs/benchmarks/forgetting.md).
bench-forgetting:
	$(PY) -m bench.forgetting

# 200 simulated devices (Locust) against the control plane as deployed (gunicorn + uvicorn workers, PostgreSQL of
# var/services/env.sh, a fresh database) and against make demo's single-process server; needs `make services-start`.
bench-api:
	source var/services/env.sh
	$(PY) -m bench.api

# Update envelopes per second through Kafka → the ingest worker → PostgreSQL (tiny preset payloads), against the
# Kafka producer alone on the same broker; a fresh database of its own. Needs `make services-start`.
bench-ingest:
	source var/services/env.sh
	$(PY) -m bench.ingest

# Tier-1 core update: DeepSpeed ZeRO-2 (2 ranks x 1 thread, torchrun, gloo) against a plain PyTorch loop with 2
# threads on the same model, data and precision (docs/tier1-core-update.md).
bench-tier1:
	$(PY) -m bench.tier1

# The test services on their own, for running single tests by hand (docs/operations/services.md).
services-start:
	scripts/services.sh start

services-stop:
	scripts/services.sh stop

services-status:
	scripts/services.sh status

clean:
	scripts/services.sh stop
	rm -rf var .mypy_cache .ruff_cache .pytest_cache
