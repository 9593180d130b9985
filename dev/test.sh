#!/usr/bin/env bash
# The developers' test command (README). Runs:
#   1. every layer (unit, contract, e2e) on torch 2.1.2, the webui's default (.venv)
#   2. the unit layer again on torch 2.14.1 with the lycoris-lora oracle (.venv-oracle)
# The e2e layer needs a real webui (SD_WEBUI_PATH); without one it is skipped and says why.
# Extra arguments go to both pytest runs (e.g. -k dora). Prints a summary per layer and exits non-zero on any
# failure or when no test ran at all.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${TUNE_TEST_REPORTS:-$(mktemp -d)}
mkdir -p "$out"
[ -x .venv/bin/python ] || { echo "no .venv: run the install command first (bash dev/install.sh)"; exit 2; }
.venv/bin/python -m pytest tests --junitxml="$out/torch212.xml" "$@"; rc1=$?
rc2=0
if [ -x .venv-oracle/bin/python ]; then
  .venv-oracle/bin/python -m pytest tests/unit --junitxml="$out/torch214.xml" "$@"; rc2=$?
else
  echo "no .venv-oracle: the torch 2.14 unit run is missing (bash dev/install.sh)"; rc2=2
fi
python3 dev/summary.py "$out"/torch212.xml "$out"/torch214.xml; rc3=$?
# pytest's 5 ("no tests collected") is a failure here too
for rc in $rc1 $rc2 $rc3; do [ "$rc" -ne 0 ] && exit 1; done
exit 0
