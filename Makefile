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

.PHONY: venv test lint typecheck djangocheck pytest demo bench-edge services-start services-stop clean

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

# Starts PostgreSQL, Redis and Kafka on 127.0.0.1, runs every check against them, and stops them again — also
# when a check fails (the trap runs on any exit).
test:
	venv="$(VENV)"
	export FEDNESTED_SERVICES_ENV="$(CURDIR)/var/services/env.sh"
	trap 'scripts/services.sh stop' EXIT
	scripts/services.sh start
	source "$$FEDNESTED_SERVICES_ENV"
	$(MAKE) --no-print-directory lint typecheck
	"$$venv/bin/python" manage.py check --fail-level WARNING
	"$$venv/bin/python" manage.py makemigrations --check --dry-run
	"$$venv/bin/python" -m pytest $(PYTEST_ARGS)

demo:
	$(PY) manage.py demo $(DEMO_ARGS)

bench-edge:
	$(PY) -m bench.edge

services-start:
	scripts/services.sh start

services-stop:
	scripts/services.sh stop

clean:
	rm -rf var .mypy_cache .ruff_cache .pytest_cache
