#!/usr/bin/env bash
# Remove every cache and leftover that vmha's setup, tests, lab and benchmarks keep
# OUTSIDE the clone, so that "fresh clone" also means "fresh machine" (then
# `VMHA_LAB=1 bash scripts/setup.sh` fetches everything again):
#
#   * the lab's artifact cache: $VMHA_LAB_CACHE, default /var/cache/vmha-lab (kernel,
#     busybox, NIC modules, udpecho, initramfs images, QEMU capability probes);
#   * apt's downloaded archives (`apt-get clean`);
#   * the default lab directory: $VMHA_LAB_DIR, default /var/lib/vmha-lab (a lab still up
#     there is taken down first with `vmha lab down`);
#   * pip's and matplotlib's caches of the invoking user (~/.cache/pip, ~/.cache/matplotlib);
#   * leftovers no process uses any more: demo work dirs (/var/tmp/vmha-demo-*), outage
#     bench roots (/tmp/vmhab-*), etcd data (/dev/shm/vmha-etcd-*), network namespaces
#     of the outage bench (vmha-bench-*).
#
# The clone itself (.venv, results/, tool caches) is left alone: `make clean` is for that.
# Root for the system paths.  `--dry-run` only prints what it would do.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
LAB_CACHE=${VMHA_LAB_CACHE:-/var/cache/vmha-lab}
LAB_DIR=${VMHA_LAB_DIR:-/var/lib/vmha-lab}
USER_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}

run() {
  echo "clean-caches: $*"
  [ "$DRY" = 1 ] || "$@"
}

# A path some live process names on its command line is still in use (another test run).
# (The glob is expanded before grep starts, so grep's own command line is not searched.)
in_use() {
  grep -qsF -- "$1" /proc/[0-9]*/cmdline
}

if [ -f "$LAB_DIR/lab.json" ]; then
  if [ -x .venv/bin/python ]; then
    run .venv/bin/python -m vmha lab down --dir "$LAB_DIR"
  else
    echo "clean-caches: a lab is up in $LAB_DIR and there is no .venv to take it down" >&2
    exit 1
  fi
fi
for dir in "$LAB_CACHE" "$LAB_DIR" "$USER_CACHE/pip" "$USER_CACHE/matplotlib"; do
  if [ -e "$dir" ]; then
    run rm -rf -- "$dir"
  fi
done
if command -v apt-get >/dev/null; then
  run apt-get clean
fi
for dir in /var/tmp/vmha-demo-* /tmp/vmhab-* /dev/shm/vmha-etcd-*; do
  [ -e "$dir" ] || continue
  if in_use "$dir"; then
    echo "clean-caches: $dir is in use; kept"
  else
    run rm -rf -- "$dir"
  fi
done
if command -v ip >/dev/null; then
  for ns in $(ip netns list 2>/dev/null | awk '/^vmha-bench-/ {print $1}'); do
    if [ -n "$(ip netns pids "$ns" 2>/dev/null)" ]; then
      echo "clean-caches: network namespace $ns is in use; kept"
    else
      run ip netns del "$ns"
    fi
  done
fi
echo "clean-caches: done"
