#!/usr/bin/env bash
# The developers' install command (README): builds the two test environments in the checkout.
#   .venv         torch 2.1.2 + the webui's pinned libraries: unit, contract and e2e layers
#   .venv-oracle  torch 2.14.1 + lycoris-lora: the unit layer again on a new torch, with the LyCORIS oracle
# Re-running is cheap: pip skips what is already installed. With TUNE_VENV_CACHE=DIR (CI sets it) the two
# environments live in DIR, keyed by a hash of their requirement files, and .venv/.venv-oracle link to them, so
# a fresh clone reuses them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

make_env() {  # name requirements setuptools [extra pip args...]
  local name=$1 req=$2 st=$3; shift 3
  local dir=$name
  if [ -n "${TUNE_VENV_CACHE:-}" ]; then
    local key; key=$(cat "$req" dev/install.sh | sha256sum | cut -c1-12)
    dir="$TUNE_VENV_CACHE/${name#.}-$key"
    mkdir -p "$TUNE_VENV_CACHE"
    if [ -e "$name" ] && [ ! -L "$name" ]; then rm -rf "$name"; fi
    ln -sfn "$dir" "$name"
    [ -f "$dir/.complete" ] && return 0
  fi
  [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
  "$dir/bin/pip" install -q --disable-pip-version-check "setuptools==$st" wheel
  "$dir/bin/pip" install -q --disable-pip-version-check -r "$req"
  [ $# -gt 0 ] && "$dir/bin/pip" install -q --disable-pip-version-check "$@"
  touch "$dir/.complete"
}

# Stability's ldm package (the code the webui runs) for the contract layer; its own pins are older than the
# webui's, so it goes in without them.
make_env .venv dev/requirements-test.txt 69.5.1 --no-deps stable-diffusion-sdkit==2.1.5
make_env .venv-oracle dev/requirements-oracle.txt 80.9.0
echo "installed: .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')), .venv-oracle ($(.venv-oracle/bin/python -c 'import torch; print("torch", torch.__version__)'))"
