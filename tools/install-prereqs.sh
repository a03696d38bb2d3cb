#!/usr/bin/env bash
# Install what `make demo` and `make test` need on a Debian 12 machine, once: the one list,
# used by the Makefile's `prereqs` target and by .ci/run. Only missing packages are installed
# (apt-get update runs only then), so a second run takes a second.
#
#   tools/install-prereqs.sh          demo and tests (root)
#   tools/install-prereqs.sh --check  exit 1, naming what is missing, without installing
set -euo pipefail

PACKAGES=(
    # the repository's own tooling: make, the test venv (from the system python3), git
    make git python3 python3-venv python3-pip ca-certificates
    # test hosts: a Debian rootfs (mmdebstrap) booted with systemd-nspawn, in namespaces
    mmdebstrap systemd-container util-linux iproute2 curl e2fsprogs openssl
    # the VM tier: qemu under TCG, a NoCloud seed, cloud-init's own schema validator
    qemu-system-x86 qemu-utils cloud-image-utils cloud-init
    # `vagrant validate` of the Vagrantfile
    vagrant
    # the client-config test pastes into fish; TLS tests: Pebble (ACME), Chromium, certutil
    fish pebble chromium libnss3-tools fonts-dejavu-core
    # the rendered Caddyfiles are checked with the real caddy in the unit tier
    caddy
    # metrics: a real Prometheus scrapes a test host; promtool tests the alert rules (unit tier)
    prometheus
    # off-host backups: restic on the test side (reading the remote's snapshots), an SFTP client
    restic openssh-client
    # vagrant-test: real Vagrant with libvirt under TCG, inside the test's own network namespace
    vagrant-libvirt libvirt-daemon-system libvirt-clients dnsmasq-base iptables slirp4netns ruby
    # aarch64: an arm64 rootfs run through qemu-user-static (binfmt)
    qemu-user-static arch-test binfmt-support
)

missing=()
for package in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$package" 2>/dev/null || true)
    [[ "$status" == ii* ]] || missing+=("$package")
done

if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi
if [[ "${1:-}" == "--check" ]]; then
    echo "missing packages: ${missing[*]} (sudo tools/install-prereqs.sh installs them)" >&2
    exit 1
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "missing packages: ${missing[*]}; run as root: sudo tools/install-prereqs.sh" >&2
    exit 1
fi

echo "installing ${#missing[@]} packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# cloud-init is installed only for its validator (`cloud-init schema`): this file keeps its
# services from ever acting on this machine, should it boot with systemd one day.
mkdir -p /etc/cloud && touch /etc/cloud/cloud-init.disabled
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
