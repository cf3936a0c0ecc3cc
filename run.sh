#!/usr/bin/env bash
# Install what the dashboard needs and open the dashboard. On a server without the offline
# demo, the dashboard builds it in the background and shows it fine-tune by fine-tune.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh requirements.txt
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-0}"
exec .venv/bin/streamlit run serve.py "$@"
