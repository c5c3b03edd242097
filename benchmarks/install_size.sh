#!/usr/bin/env bash
# The size of a user's environment for each way of installing facegender: throw-away virtual environments
# with the package built from this checkout and the versions of constraints.txt.
#   benchmarks/install_size.sh            (PYTHON=python3.11 to choose the interpreter; EXTRAS="core openvino"
#                                          to measure only some)
# Last line: install: C MB core, D MB with serve, E MB with train, F MB with openvino
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
work=$(mktemp -d /tmp/facegender-install-size.XXXXXX)
trap 'rm -rf "$work"' EXIT
declare -A size
EXTRAS=${EXTRAS:-core serve train openvino}
for extra in $EXTRAS; do
  spec=.
  [ "$extra" != core ] && spec=".[$extra]"
  "$PYTHON" -m venv "$work/$extra"
  "$work/$extra/bin/python" -m pip install --quiet --upgrade pip 2>/dev/null
  "$work/$extra/bin/python" -m pip install --quiet -c constraints.txt "$spec" 2>&1 | grep -v "^WARNING: Location" || true
  "$work/$extra/bin/facegender" --help > /dev/null  # it installed and starts
  size[$extra]=$(du -sm "$work/$extra" | cut -f1)
  echo "$extra: ${size[$extra]} MB ($("$work/$extra/bin/python" -m pip list 2>/dev/null | tail -n +3 | wc -l) packages)"
  rm -rf "$work/$extra"
done
line=""
for extra in $EXTRAS; do
  line+="${line:+, }${size[$extra]} MB $([ "$extra" = core ] && echo core || echo "with $extra")"
done
echo "install: $line"
