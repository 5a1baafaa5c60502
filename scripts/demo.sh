#!/usr/bin/env bash
# Set up (apt packages + venv) and run the demo cluster on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec make demo
