# devpi-agent developer tasks.
SHELL := bash

# Build tool pin: bumping it may change the bytes of dist/devpi-agent.
PEX_VERSION := 2.105.2
export PEX_VERSION

# Directories are listed too, so adding or removing a file triggers a rebuild.
DIST_INPUTS := $(shell find agent units -name __pycache__ -prune -o ! -name '*.pyc' -print) \
               pex.lock requirements.in tools/build-dist.sh Makefile

# Test tooling lives in .venv (made from the system python3, like the hosts' agent).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: dist lock venv lint unit integration test demo demo-stop clean

## dist: build dist/devpi-agent (single-file pex) and dist/devpi-agent.sha256
dist: dist/devpi-agent

dist/devpi-agent: $(DIST_INPUTS)
	tools/build-dist.sh

## lock: regenerate pex.lock from requirements.in
lock:
	tools/build-dist.sh lock

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

## venv: the test tooling (pytest, ruff, mypy, twine, uv, build) in .venv
venv: $(VENV)/.installed

## lint: ruff and mypy
lint: venv
	$(VENV)/bin/ruff check agent tests tools
	$(VENV)/bin/ruff format --check agent tests tools
	$(VENV)/bin/mypy

## unit: the fast tier (no root needed)
unit: venv
	$(VENV)/bin/pytest tests/unit -q

## integration: boots systemd-nspawn hosts and drives them with twine, pip and uv (root)
integration: venv dist
	$(VENV)/bin/pytest tests/integration -v -rA

## test: everything CI runs (as root)
test: venv dist
	$(MAKE) lint
	$(VENV)/bin/pytest tests -v -rA

## demo: converge a throwaway local container and print a ready-to-paste pip command (root)
demo: venv dist
	$(PY) tools/demo.py up

## demo-stop: stop and delete the demo container
demo-stop: venv
	$(PY) tools/demo.py down

clean:
	rm -rf dist .venv-build .pytest_cache .mypy_cache .ruff_cache
