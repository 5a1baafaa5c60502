#!/usr/bin/env bash
# Set up (apt packages + venv) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec make check
