"""etcd auth on a local cluster (the lab's and the fake demo's): turning it on the way an
operator does (docs/operator-guide.md, "etcd authentication"), `vmha` as one of its users
(the operator's writes), and showing that it holds.

Both need the cluster's etcd to serve TLS with client certificates of the lab's etcd CA
(:mod:`lab.etcdpki`) and no daemon running yet.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lab.etcdpki import ROOT, EtcdPki, cli_flags, node_user, user
from schemas.keys_v2 import KeyspaceV2
from schemas.models_v2 import KeyspaceVersion
from store.errors import PermissionDenied
from store.etcd import EtcdStore


def enable_auth(endpoints: str, prefix: str, pki: EtcdPki, nodes: Sequence[str],
                log: Path) -> None:
    """Keyspace 2's marker (as `vmha keyspace migrate` leaves it), then `vmha auth setup`
    as root for ``nodes``: roles, users (one per certificate CN) and auth on.

    ``vmha auth setup``'s output goes to ``log``; a failure raises, naming its error."""
    marker = KeyspaceVersion(keyspace=2, state="done", started_at=time.time(),
                             by="root:lab", tool_version="lab")
    store = EtcdStore(endpoints, tls=pki.client(ROOT))
    try:
        store.put(KeyspaceV2(prefix).version, marker.to_json())
    finally:
        store.close()
    proc = subprocess.run([sys.executable, "-m", "vmha", "--etcd", endpoints, "--prefix",
                           prefix, *cli_flags(pki.client(ROOT)), "auth", "setup", "--nodes",
                           ",".join(nodes), "--root-cn-only"],
                          capture_output=True, text=True, timeout=120, check=False)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"vmha auth setup failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-500:]}")


def vmha_as(endpoints: str, prefix: str, pki: EtcdPki, user: str, *args: str) -> str:
    """`vmha ARGS` in this process, logged in as etcd user ``user`` (its certificate):
    its output; RuntimeError naming its error if it fails."""
    from cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--etcd", endpoints, "--prefix", prefix, *cli_flags(pki.client(user)),
                     *args])
    if code != 0:
        raise RuntimeError(f"vmha {' '.join(args)} as {user} failed ({code}): "
                           f"{err.getvalue().strip()[-500:]}")
    return out.getvalue()


def _refused(endpoints: str, pki: EtcdPki, user: str, what: str,
             write: Callable[[EtcdStore], object]) -> str:
    store = EtcdStore(endpoints, tls=pki.client(user))
    try:
        before = store.revision()
        try:
            write(store)
        except PermissionDenied:
            pass
        else:
            raise RuntimeError(f"etcd let {user} {what}: auth is not on")
        after = store.revision()
    finally:
        store.close()
    if after != before:
        raise RuntimeError(f"{user} {what}: refused, yet the revision moved "
                           f"{before} -> {after}")
    return f"{user:<9} {what:<44} -> permission denied (revision {after} unchanged)"


def refusals(endpoints: str, prefix: str, pki: EtcdPki, n1: str, n2: str) -> list[str]:
    """Writes auth must refuse, sent: ``n1``'s certificate writing ``n2``'s registration
    (registered, so a lease to revoke) and a placement; the operator's revoking ``n2``'s
    lease (root's).  One line each; raises if one applies or the revision moves."""
    ks = KeyspaceV2(prefix)
    operator, as_n1 = user("operator", prefix), node_user(n1, prefix)
    reader = EtcdStore(endpoints, tls=pki.client(operator))
    try:
        reg = reader.get(ks.reg(n2))
    finally:
        reader.close()
    if reg is None:
        raise RuntimeError(f"{n2} is not registered")
    return [
        _refused(endpoints, pki, as_n1, f"put {ks.reg(n2)}",
                 lambda s: s.put(ks.reg(n2), reg.value.decode())),
        _refused(endpoints, pki, as_n1, f"put {ks.place('web1')}",
                 lambda s: s.put(ks.place("web1"), "{}")),
        _refused(endpoints, pki, operator, f"revoke {n2}'s lease ({reg.lease:x}; root's)",
                 lambda s: s.revoke_lease(reg.lease)),
    ]


def etcdctl(endpoints: str, pki: EtcdPki, user: str) -> list[str]:
    """etcdctl on ``endpoints`` (TLS), logged in as ``user``."""
    from lab.etcdpki import etcdctl_flags

    https = ",".join(f"https://{e}" for e in endpoints.split(","))
    return ["etcdctl", f"--endpoints={https}", *etcdctl_flags(pki.client(user))]
