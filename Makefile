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

# The GitHub repository whose releases carry the agent; cloud-init.yaml downloads from it.
RELEASE_REPO := devpi-agent/devpi-agent
AGENT_URL := https://github.com/$(RELEASE_REPO)/releases/latest/download/devpi-agent
CLOUD_INIT_YAML ?= cloud-init.yaml
# The Vagrantfile's user data (tests/vagrant writes one elsewhere).
VAGRANT_USER_DATA ?= dist/vagrant-user-data.yaml

.PHONY: dist lock lock-agent lock-devpi venv lint unit integration test demo demo-stop bench \
        clean release vagrant-user-data vm vagrant-test reliability prereqs arm64-apply

## dist: build dist/devpi-agent (single-file pex) and dist/devpi-agent.sha256
dist: dist/devpi-agent

dist/devpi-agent: $(DIST_INPUTS)
	tools/build-dist.sh

## release: dist/devpi-agent, its .sha256 and dist/SHA256SUMS (what a GitHub release carries)
release: dist
	cd dist && sha256sum devpi-agent > SHA256SUMS
	cat dist/SHA256SUMS

## cloud-init.yaml: regenerate the committed user-data from units/cloud-init.yaml.j2
$(CLOUD_INIT_YAML): units/cloud-init.yaml.j2 agent/commands/userdata.py | venv
	$(PY) -m agent user-data --placeholders --agent-url '$(AGENT_URL)' > $@.tmp
	mv $@.tmp $@

## vagrant-user-data: dist/vagrant-user-data.yaml for the Vagrantfile (prints a new password)
vagrant-user-data: $(VAGRANT_USER_DATA)

$(VAGRANT_USER_DATA): dist/devpi-agent
	rm -f $@
	dist/devpi-agent user-data --domain localhost --tls internal --https-port 8443 \
	    --http-port 0 --user devops --agent-url file:///opt/devpi-agent-dist/devpi-agent \
	    --agent-file dist/devpi-agent -o $@

## lock: regenerate both locks (pex.lock for the agent, units/devpi.lock for devpi's venv)
lock: lock-agent lock-devpi

## lock-agent: regenerate pex.lock from requirements.in
lock-agent:
	tools/build-dist.sh lock

## lock-devpi: regenerate units/devpi.lock (hash-pinned, universal) from devpi-requirements.in
lock-devpi: venv
	tools/lock-devpi.sh

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

## prereqs: the Debian packages the demo and the root test tiers need (installs what is missing)
prereqs:
	tools/install-prereqs.sh

## venv: the test tooling (pytest, ruff, mypy, twine, uv, build) in .venv
venv: $(VENV)/.installed

## lint: ruff, mypy, and the layers (import-linter: docs/architecture.md)
lint: venv
	$(VENV)/bin/ruff check agent tests tools bench
	$(VENV)/bin/ruff format --check agent tests tools bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

## unit: the fast tier (no root needed)
unit: venv
	$(VENV)/bin/pytest tests/unit -q

## integration: boots systemd-nspawn hosts and drives them with twine, pip and uv (root)
integration: prereqs venv dist
	$(VENV)/bin/pytest tests/integration -v -rA

## vm: boots Debian 12 and 13 cloud VMs (qemu, TCG) with cloud-init.yaml's template as user data (root)
vm: prereqs venv dist
	$(VENV)/bin/pytest tests/vm -v -rA

## vagrant-test: `vagrant up --provider=libvirt` with this Vagrantfile, the real clients, destroy (root)
vagrant-test: prereqs venv dist
	$(VENV)/bin/pytest tests/vagrant -v -rA

## arm64-apply: a full apply on an arm64 host emulated with qemu-user (not in `make test`; root)
arm64-apply: prereqs venv dist
	$(VENV)/bin/pytest tests/integration/arm64_apply.py -v -rA

## test: everything CI runs (as root). Two workers, one test file each at a time: hosts spend
## much of their time waiting on downloads, so two files at once halve the wall time.
test: prereqs venv dist
	$(MAKE) lint
	$(VENV)/bin/pytest tests -v -rA -n 2 --dist loadfile --ignore=tests/vagrant

## demo: converge a throwaway local container and print a ready-to-paste pip command (root)
demo: prereqs venv dist
	$(PY) tools/demo.py up

## demo-stop: stop and delete the demo container
demo-stop: venv
	$(PY) tools/demo.py down

## reliability: crashes, bad input, secrets, locks, reboot, load; then docs/reliability.md (root)
reliability: prereqs venv dist
	$(VENV)/bin/pytest tests/unit/test_bad_input.py -q
	$(VENV)/bin/pytest tests/integration/test_reliability.py -v -rA
	$(PY) tools/reliability_table.py

## bench: performance figures (issue #6) into bench/results/ (root; ~6 min)
bench: prereqs venv dist
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf dist .venv-build .pytest_cache .mypy_cache .ruff_cache
