#!/usr/bin/env bash
# Set up on a fresh machine and run the demo: a local control plane, two simulated GPU
# nodes (real agents over fake Ollama/vLLM), the operator, and the examples converging.
# Extra arguments go to `vram-operator demo` (e.g. --keep-running).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
[[ -x "${VENV}/bin/python" ]] || "${PYTHON}" -m venv "${VENV}"
"${VENV}/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
# Simulated nodes start a Python process per backend and per vLLM model; where
# PYTHONDONTWRITEBYTECODE is set each would compile the package again: compile it once.
"${VENV}/bin/python" -m compileall -q vram_operator
export PATH="${PWD}/${VENV}/bin:${PATH}"
bash scripts/install-control-plane.sh
exec vram-operator demo "$@"
