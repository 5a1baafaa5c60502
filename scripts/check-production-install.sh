#!/usr/bin/env bash
# Check the operator guide's production install: `pip install .` into a venv that sees
# Debian's python3-libvirt (--system-site-packages) builds nothing native and pulls
# neither a browser nor a compiler.  No C compiler is reachable while pip runs (PATH
# without gcc/cc, CC=false): a package that needs one fails the check.
# Usage: bash scripts/check-production-install.sh [VENV_DIR]   (needs python3-libvirt)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-$(mktemp -d /tmp/vmha-prod-venv.XXXXXX)}
dpkg-query -W -f='${Status}' python3-libvirt 2>/dev/null | grep -q "install ok installed" \
  || { echo "check: python3-libvirt is not installed (apt-get install python3-libvirt)" >&2
       exit 1; }
nocc=$(mktemp -d /tmp/vmha-nocc.XXXXXX)
trap 'rm -rf "$nocc"' EXIT
# A PATH of the usual tools minus every compiler driver.
for dir in /usr/local/bin /usr/bin /bin; do
  for tool in "$dir"/*; do
    name=$(basename "$tool")
    case "$name" in
      gcc*|g++*|cc|c++|c89*|c99*|cpp*|clang*|x86_64-linux-gnu-*|ld|ld.*|as) continue ;;
    esac
    [ -e "$nocc/$name" ] || ln -s "$tool" "$nocc/$name"
  done
done
/usr/bin/python3 -m venv --system-site-packages "$venv"
export PATH="$nocc" CC=false CXX=false LDSHARED=false
# --no-cache-dir: a wheel built earlier on this host (e.g. libvirt-python by setup.sh)
# must not hide a build that a fresh host would need a compiler for.
log=$nocc/pip.log
if ! "$venv/bin/pip" install -q --no-cache-dir . >"$log" 2>&1; then
  grep -v "^WARNING: Location" "$log" >&2
  echo "check: pip install . failed without a compiler (see above)" >&2
  exit 1
fi
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import libvirt
assert libvirt.__file__.startswith("/usr/lib/python3/dist-packages/"), libvirt.__file__
dist = md.distribution("vmha")
need = {r.split(";")[0].split(">")[0].split("=")[0].strip().lower() for r in dist.requires or []
        if "extra ==" not in r}
print("vmha", dist.version, "with libvirt from", libvirt.__file__, "; runtime deps:",
      ", ".join(sorted(need)))
PY
"$venv/bin/vmha" --help >/dev/null
if "$venv/bin/pip" list 2>/dev/null | grep -iE "^(matplotlib|pytest|ruff|mypy|selenium) "; then
  echo "check: test-only packages in the production venv" >&2
  exit 1
fi
echo "check: production install ok in $venv (no compiler reachable, no browser)"
