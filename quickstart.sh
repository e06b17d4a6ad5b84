#!/usr/bin/env bash
# One command: set up a virtual environment and run the main job (a hyperparameter
# search) on the embedded synthetic data set, on the CPU, in a few minutes.
#   bash quickstart.sh            # set-up + search smoke run (outputs in runs/search/)
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip show torch >/dev/null 2>&1 || python -m pip install --quiet torch==2.13.0   # CPU wheel
python -m pip install --quiet -e ".[dev]"
python tune/search.py --space configs/space.yaml --smoke-test "$@"
