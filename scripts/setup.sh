#!/usr/bin/env bash
# Install what vmha's tests, lab and demos need on Debian 12 (run as root): apt packages
# and a venv in .venv with the test extras.  Idempotent: a second run only checks.
# A production host needs much less and no compiler or browser: docs/operator-guide.md,
# "Install vmha" (checked by scripts/check-production-install.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

# prometheus: the package that ships promtool on Debian 12 (tests check vmha's /metrics
# with `promtool check metrics`); the server it also carries is not used.
# Development and tests only: gcc, python3-dev, pkg-config and libvirt-dev build
# libvirt-python from source in .venv (production uses Debian's python3-libvirt);
# chromium drives the web UI tests; etcd runs in the tests and the demo.
APT_PACKAGES=(etcd-server etcd-client python3 python3-venv python3-dev gcc make pkg-config
              libvirt-dev git chromium chromium-driver openssl prometheus nftables)
if [ "${VMHA_LAB:-0}" = 1 ] && [ -f lab/APT_PACKAGES.txt ]; then
  mapfile -t LAB < <(grep -v '^\s*#' lab/APT_PACKAGES.txt | sed '/^\s*$/d')
  APT_PACKAGES+=("${LAB[@]}")
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts etcd and prometheus services on install where systemd runs; vmha's tests
# and demo start their own etcd on free ports and need neither service.

PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.vmha-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -c constraints.txt -e '.[dev]'
  touch "$stamp"
fi
if [ "${VMHA_LAB:-0}" = 1 ]; then
  # The lab's one download step: Debian's kernel and busybox-static (apt-get download;
  # nothing is installed), the network guest's NIC modules and udpecho, the initramfs
  # images, all into /var/cache/vmha-lab (or $VMHA_LAB_CACHE).  The lab, the demo, the
  # outage bench and the tests only read that cache: nothing downloads at run time.
  .venv/bin/python -m lab.fetch \
    || { echo "setup: cannot fetch the lab's guest artifacts (see above)" >&2; exit 1; }
fi
echo "setup: ok"
