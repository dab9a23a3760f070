#!/usr/bin/env bash
# Set up and run every check on a fresh machine: a virtualenv with the package and its test
# extra, the local control plane (built once, then cached), lint, types, import contracts
# and all test tiers. Extra arguments go to pytest (e.g. `scripts/test.sh -m unit`).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

log() { printf '[test] %s\n' "$*" >&2; }

if [[ ! -x "${VENV}/bin/python" ]]; then
    log "creating ${VENV}"
    "${PYTHON}" -m venv "${VENV}"
fi
# The diffusion extra (CPU PyTorch 2.13.0, diffusers) lets the tests build tiny real
# pipelines of every Stable Diffusion family; the package itself never needs it.
log "installing vram-operator[test,diffusion] into ${VENV}"
"${VENV}/bin/python" -m pip install -q --disable-pip-version-check -e ".[test,diffusion]"
# Simulated nodes start a Python process per backend and per vLLM model; where
# PYTHONDONTWRITEBYTECODE is set each would compile the package again: compile it once.
"${VENV}/bin/python" -m compileall -q vram_operator
export PATH="${PWD}/${VENV}/bin:${PATH}"

log "installing the local control plane (cached after the first build)"
bash scripts/install-control-plane.sh

log "ruff"
ruff check .
ruff format --check .
log "mypy"
mypy vram_operator tests bench
log "import contracts"
lint-imports

log "pytest"
set +e
python -m pytest -m "not benchmark and not stress" "$@"
status=$?
set -e
if [[ ${status} -eq 5 ]]; then
    log "pytest collected no tests: that is a failure here"
    exit 1
fi
exit ${status}
