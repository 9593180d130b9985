#!/usr/bin/env bash
# The developers' install command (README): builds the two test environments in the checkout.
#   .venv         torch 2.1.2 + the webui's pinned libraries: unit, contract and e2e layers
#   .venv-oracle  torch 2.14.1 + lycoris-lora: the unit layer again on a new torch, with the LyCORIS oracle
# Re-running is cheap: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check setuptools==69.5.1 wheel
.venv/bin/pip install -q --disable-pip-version-check -r dev/requirements-test.txt
# Stability's ldm package (the code the webui runs) for the contract layer; its own pins are older than the
# webui's, so it goes in without them.
.venv/bin/pip install -q --disable-pip-version-check --no-deps stable-diffusion-sdkit==2.1.5
[ -x .venv-oracle/bin/python ] || "$PY" -m venv .venv-oracle
.venv-oracle/bin/pip install -q --disable-pip-version-check setuptools==80.9.0 wheel
.venv-oracle/bin/pip install -q --disable-pip-version-check -r dev/requirements-oracle.txt
echo "installed: .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')), .venv-oracle ($(.venv-oracle/bin/python -c 'import torch; print("torch", torch.__version__)'))"
