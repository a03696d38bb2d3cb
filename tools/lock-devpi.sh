#!/usr/bin/env bash
# Regenerate units/devpi.lock from devpi-requirements.in, and units/uv.lock (the installer) from
# uv-requirements.in: every package of devpi's venv, with
# sha256 hashes, for CPython 3.10-3.13 on x86_64 and aarch64 (environment markers, one lock).
# uv comes from the test tooling (.venv, `make venv`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
UV="${UV:-$ROOT/.venv/bin/uv}"
"$UV" pip compile \
    --universal \
    --python-version 3.10 \
    --generate-hashes \
    --no-header \
    --no-annotate \
    --quiet \
    devpi-requirements.in \
    -o units/devpi.lock
echo "wrote units/devpi.lock ($(grep -c '==' units/devpi.lock) pins)"
# The installer: one pin, with the hash of every wheel of that version (each platform's).
"$UV" pip compile \
    --universal \
    --python-version 3.10 \
    --generate-hashes \
    --no-header \
    --no-annotate \
    --quiet \
    uv-requirements.in \
    -o units/uv.lock
echo "wrote units/uv.lock ($(grep -c -- '--hash' units/uv.lock) hashes)"
