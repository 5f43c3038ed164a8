#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with diffexit installed editable with its test
# and eval extras. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch 2.14.1 + torchvision 0.29.1 come from local disk on these machines and run on CPU
# (the 2.13.0+cpu wheel is avoided: torchvision does not import beside it).
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[test,eval]"
# The browser test drives Debian's system Chromium through Playwright (no browser download at test time).
if ! command -v chromium >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup.sh: no chromium; the browser test will skip (as root on Debian: apt-get install -y chromium)" >&2
  fi
fi
