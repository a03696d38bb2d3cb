#!/usr/bin/env bash
# Build dist/devpi-agent: one executable pex (venv mode, /usr/bin/python3)
# holding the agent package, the units/ templates and the dependencies locked
# in pex.lock, for CPython 3.10-3.13 on x86_64 and aarch64; and
# dist/devpi-agent.sha256 (sha256sum format).
#
# Identical inputs give a byte-identical pex: pex writes fixed zip
# timestamps, and the sources are staged with normalised file modes.
#
# Warm starts skip pex's Python bootstrap: --sh-boot puts a POSIX sh
# script in front of the zip that execs the venv already unpacked under
# the runtime PEX_ROOT (0.08 s of the 0.13 s `devpi-agent version` took);
# the first start, or `python3 devpi-agent`, still runs the zip. The
# interpreter constraint (the CPythons the platforms below cover) is what
# lets that script name the venv at build time: without one pex hashes the
# running interpreter's path into the venv's directory, which a build
# machine cannot know. The venv is then one per host, not one per
# interpreter: after an OS upgrade that removes the python it was made
# with, remove /var/cache/devpi-agent/pex (the next start unpacks again).
#
#   tools/build-dist.sh          build dist/devpi-agent (what `make dist` runs)
#   tools/build-dist.sh lock     regenerate pex.lock from requirements.in
#
# The pex version is pinned in the Makefile (PEX_VERSION); `make` passes it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PEX_VERSION="${PEX_VERSION:-$(sed -n 's/^PEX_VERSION[[:space:]]*:\{0,1\}=[[:space:]]*//p' Makefile)}"
[[ -n "$PEX_VERSION" ]] || { echo "PEX_VERSION is not set and not found in Makefile" >&2; exit 1; }
# The pip that pex resolves with. Pinned: pex's "latest" may name a release
# the index does not serve, and a pinned resolver keeps `make lock` stable.
PEX_PIP_VERSION="26.2.1"

VENV="$ROOT/.venv-build"
DIST="$ROOT/dist"
OUT="$DIST/devpi-agent"

# One target per (arch, CPython minor). Abbreviated platforms assume
# manylinux2014 (glibc 2.17), which every wheel we lock provides.
PLATFORMS=()
for arch in x86_64 aarch64; do
    for minor in 10 11 12 13; do
        PLATFORMS+=(--platform "manylinux2014_${arch}-cp-3${minor}-cp3${minor}")
    done
done

export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-315532800}"  # 1980-01-01, pex's own default
export PYTHONHASHSEED=0

ensure_venv() {
    if [[ "$("$VENV/bin/pex" --version 2>/dev/null || true)" != "$PEX_VERSION" ]]; then
        [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "pex==$PEX_VERSION"
    fi
}

lock() {
    "$VENV/bin/pex3" lock create \
        --style universal \
        --target-system linux \
        --interpreter-constraint "CPython>=3.10,<3.14" \
        --pip-version "$PEX_PIP_VERSION" \
        --wheel --no-build \
        --elide-unused-requires-dist \
        --indent 2 \
        -r requirements.in \
        -o pex.lock
    echo "wrote pex.lock"
}

# Fail if requirements.in was edited without re-locking.
check_lock_fresh() {
    "$VENV/bin/python" - <<'EOF'
import json, sys
from pex.third_party.packaging.requirements import Requirement
from pex.third_party.packaging.utils import canonicalize_name

def key(text):
    r = Requirement(text)
    return (canonicalize_name(r.name), str(r.specifier), str(r.marker or ""), tuple(sorted(r.extras)))

wanted = set()
with open("requirements.in") as f:
    for line in f:
        line = line.split("#", 1)[0].strip()
        if line:
            wanted.add(key(line))
with open("pex.lock") as f:
    locked = {key(r) for r in json.load(f)["requirements"]}
if wanted != locked:
    sys.exit("pex.lock does not match requirements.in: run `make lock`")
EOF
}

build() {
    check_lock_fresh

    STAGE="$(mktemp -d)"
    trap 'rm -rf "$STAGE"' EXIT

    # Stage exactly what goes in: agent/ and units/ as top-level siblings
    # (agent.resources.units_dir() relies on that), without caches.
    mkdir -p "$STAGE/src"
    cp -R agent units "$STAGE/src/"
    find "$STAGE/src" \( -name __pycache__ -o -name '*.pyc' \) -prune -exec rm -rf {} +
    find "$STAGE/src" -type d -exec chmod 755 {} +
    find "$STAGE/src" -type f -exec chmod 644 {} +

    "$VENV/bin/pex" \
        --lock pex.lock \
        "${PLATFORMS[@]}" \
        --sources-directory "$STAGE/src" \
        --entry-point agent.commands.cli:main \
        --venv \
        --python-shebang /usr/bin/python3 \
        --sh-boot \
        --interpreter-constraint "CPython>=3.10,<3.14" \
        --runtime-pex-root /var/cache/devpi-agent/pex \
        --no-compile \
        --no-use-system-time \
        --pip-version "$PEX_PIP_VERSION" \
        --tmpdir "$STAGE" \
        -o "$STAGE/devpi-agent" >/dev/null

    mkdir -p "$DIST"
    mv -f "$STAGE/devpi-agent" "$OUT"
    (cd "$DIST" && sha256sum devpi-agent > devpi-agent.sha256)
    cat "$DIST/devpi-agent.sha256"
    ls -l "$OUT"
}

ensure_venv
case "${1:-build}" in
    build) build ;;
    lock) lock ;;
    *) echo "usage: $0 [build|lock]" >&2; exit 2 ;;
esac
