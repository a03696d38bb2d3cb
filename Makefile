# devpi-agent developer tasks.
SHELL := bash

# Build tool pin: bumping it may change the bytes of dist/devpi-agent.
PEX_VERSION := 2.105.2
export PEX_VERSION

# Directories are listed too, so adding or removing a file triggers a rebuild.
DIST_INPUTS := $(shell find agent units -name __pycache__ -prune -o ! -name '*.pyc' -print) \
               pex.lock requirements.in tools/build-dist.sh Makefile

.PHONY: dist lock

## dist: build dist/devpi-agent (single-file pex) and dist/devpi-agent.sha256
dist: dist/devpi-agent

dist/devpi-agent: $(DIST_INPUTS)
	tools/build-dist.sh

## lock: regenerate pex.lock from requirements.in
lock:
	tools/build-dist.sh lock
