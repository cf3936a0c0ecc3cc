#!/usr/bin/env bash
# Install what the tests need (Python packages, Debian's Chromium for the browser tests)
# and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh requirements-dev.txt
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
export HF_HUB_OFFLINE=1
# The layers and forbidden imports of docs/architecture.md (pyproject.toml, [tool.importlinter]).
.venv/bin/lint-imports
exec .venv/bin/python -m pytest "$@"
