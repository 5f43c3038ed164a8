#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with diffexit installed editable, its test
# extras, and (for the browser tests) Debian's chromium. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch 2.14.1 + torchvision 0.29.1 come from local disk on these machines and run on CPU
# (the 2.13.0+cpu wheel is avoided: torchvision does not import beside it).
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[test]"
if [[ "${DIFFEXIT_SKIP_BROWSER:-0}" != 1 ]] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "setup: chromium not installed; browser tests will be skipped" >&2
  else
    echo "setup: chromium missing and apt-get unavailable; browser tests will be skipped" >&2
  fi
fi
