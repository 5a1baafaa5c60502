#!/usr/bin/env bash
# Set up (apt packages, the lab's too when root; venv) and run lint and the whole test
# suite, the lab's real-QEMU end-to-end tests included (they skip, saying why, without
# root, unshare or libvirtd).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then
  export VMHA_LAB=1
fi
bash scripts/setup.sh
exec make check
