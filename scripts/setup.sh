#!/usr/bin/env bash
# Idempotent set-up: system packages (espeak-ng, chromium), a venv in .venv, mtser (editable) with the extras named
# by the argument (pyproject.toml: full, test, bench; default full,test), each package at its requirements.lock pin.
# `make demo` runs `setup.sh full`, `make test` runs `setup.sh full,test`; bench/store_read.py's peers: `full,bench`.
# Re-running is cheap: pip work is skipped while requirements.lock, pyproject.toml and the extras are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${1:-full,test}
case "$EXTRAS" in *[!a-z,]*|"") echo "usage: bash scripts/setup.sh [EXTRAS, e.g. full,test]" >&2; exit 2;; esac

# System packages: espeak-ng (the demo corpus's speech), chromium with the test extra (the tests render the HTML pages
# headless).
tools=espeak-ng
case ",$EXTRAS," in *,test,*) tools="$tools chromium";; esac
for tool in $tools; do
    if ! command -v $tool >/dev/null 2>&1; then
        echo "setup: installing $tool"
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
        $SUDO apt-get install -y -q $tool >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q $tool >/dev/null; }
    fi
done

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    $PYTHON -m venv .venv
fi

stamp=.venv/.mtser-installed-${EXTRAS//,/-}
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing mtser[$EXTRAS] at the pinned versions (first time: a few minutes; torch alone is 5 GB)"
    # the lock as constraints: only what these extras need is installed, each at its pinned version
    .venv/bin/pip install -q --disable-pip-version-check -c requirements.lock -e ".[$EXTRAS]" 2>&1 \
        | grep -v "^WARNING: Location" || true
    .venv/bin/python -c "import torch, torchaudio, transformers, ray, zarr, mtser"
    echo "$want" > "$stamp"
fi

# The optional C kernel of the trainer's ASP pooling (`make native`; 1.1-3.9x faster demo-size CPU cohort steps, see
# docs/benchmarks.md). Built where a C compiler is found; without one the trainer runs its PyTorch path.
if command -v "${CC:-cc}" >/dev/null 2>&1; then
    make -s native || echo "setup: building the native kernel failed; the trainer runs its PyTorch path"
else
    echo "setup: no C compiler (${CC:-cc}): the native kernel is not built; the trainer runs its PyTorch path"
fi
