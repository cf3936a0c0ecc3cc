#!/usr/bin/env bash
# Create .venv (if missing) and install a requirements file into it.
# Usage: scripts/setup.sh requirements.txt|requirements-dev.txt
set -euo pipefail
cd "$(dirname "$0")/.."
req="${1:-requirements.txt}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch==2.13.0 is pinned: on the dev/CI machines it resolves to the local CPU wheel.
.venv/bin/python -m pip install --quiet -r "$req"
