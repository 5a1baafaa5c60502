#!/usr/bin/env bash
# Set up (apt packages incl. the lab's, venv, Linux guest kernel) and run the demo on this
# machine: real etcd, libvirt nodes and QEMU guests (needs root; otherwise the same story
# on the fake hypervisor).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "demo: not root, so no libvirt lab; running the demo on the fake hypervisor" >&2
  bash scripts/setup.sh
  exec make demo-fake
fi
VMHA_LAB=1 bash scripts/setup.sh
exec make demo
