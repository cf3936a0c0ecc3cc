#!/usr/bin/env bash
# Install what the dashboard needs, build the offline demo if missing, open the dashboard.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh requirements.txt
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-0}"
.venv/bin/python -m analysis demo
exec .venv/bin/streamlit run app.py "$@"
