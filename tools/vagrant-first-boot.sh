#!/bin/bash
# Vagrant's shell provisioner (as root): hand the user data the file provisioner copied into the
# VM to cloud-init, as a cloud's first boot would, and wait for the result.
#
#   vagrant-first-boot.sh UPLOAD_DIR GUEST_AGENT
#
# UPLOAD_DIR holds devpi-agent and user-data; the agent goes to GUEST_AGENT, where the user
# data's file:// agent URL points (its sha256 is still checked by the bootstrap). cloud-init
# forgets the box's own first boot (`cloud-init clean`), gets a NoCloud seed with a new
# instance-id, and runs its four stages: the same write_files and runcmd as on EC2. Exit 0 when
# cloud-init is done without errors; otherwise the tail of its output log and exit 1, which
# makes `vagrant up` fail.
set -euo pipefail

upload_dir=$1
guest_agent=$2
seed=/var/lib/cloud/seed/nocloud
output_log=/var/log/cloud-init-output.log

fail() {
    echo "devpi-agent first boot: FAILED: $*" >&2
    if [[ -e $output_log ]]; then
        echo "----- the end of $output_log -----" >&2
        tail -n 60 "$output_log" >&2
    fi
    exit 1
}

command -v cloud-init >/dev/null || fail "this box has no cloud-init"
[[ -s $upload_dir/devpi-agent && -s $upload_dir/user-data ]] \
    || fail "$upload_dir/devpi-agent or $upload_dir/user-data is missing (the file provisioners)"

# The box's own boot may still be in cloud-init: let it finish before starting over.
cloud-init status --wait >/dev/null 2>&1 || true

install -D -m 0755 -o root -g root "$upload_dir/devpi-agent" "$guest_agent"
install -d -m 0700 -o root -g root "$seed"
install -m 0600 -o root -g root "$upload_dir/user-data" "$seed/user-data"
rm -rf "$upload_dir"   # the user data holds passwords; it stays only where cloud-init keeps it
printf 'instance-id: iid-devpi-agent-vagrant-%s\nlocal-hostname: devpi-agent\n' \
    "$(cat /proc/sys/kernel/random/uuid)" > "$seed/meta-data"
cat > /etc/cloud/cloud.cfg.d/99-devpi-agent-vagrant.cfg <<'CFG'
# devpi-agent's Vagrantfile: the user data is the NoCloud seed in /var/lib/cloud/seed/nocloud.
datasource_list: [NoCloud]
CFG

cloud-init clean --logs
echo "devpi-agent first boot: running cloud-init's stages (the bootstrap converges the server)"
started=$(date +%s)
stages_ok=1
cloud-init init --local || stages_ok=0
cloud-init init || stages_ok=0
cloud-init modules --mode config || stages_ok=0
cloud-init modules --mode final || stages_ok=0

status_rc=0
status=$(cloud-init status --wait --long 2>&1) || status_rc=$?
echo "$status"
echo "devpi-agent first boot: cloud-init took $(( $(date +%s) - started ))s"
# 2: done with recoverable errors (newer cloud-init), e.g. a deprecated key.
if [[ $stages_ok != 1 ]] || { [[ $status_rc != 0 ]] && [[ $status_rc != 2 ]]; } \
    || ! grep -q 'status: done' <<<"$status"; then
    fail "cloud-init did not finish cleanly (status exit $status_rc)"
fi
grep -h 'recap:' /var/log/devpi-agent/bootstrap.log 2>/dev/null | tail -n 1 || true
