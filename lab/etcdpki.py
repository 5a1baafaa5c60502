"""The lab's etcd CA: etcd's server certificate and a client certificate per etcd user.

With auth on (docs/keyspace-v2.md, section 5) etcd serves TLS only, asks every client for
a certificate of this CA (``--client-cert-auth``) and logs it in as the user its common
name names: ``root``, ``orchestrator``, ``node-<name>``, ``operator``, ``monitoring``.
The CA lives in ``<lab root>/pki-ca-etcd`` (:func:`lab.pki.ca_dir`), so the lab's
tear-down removes it with the nodes' CAs; everything is generated locally by openssl.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lab import pki
from lab.localcluster import EtcdServerTls
from schemas.acl import DEFAULT_PREFIX, RoleKind, RoleRef, role_name
from schemas.keys_v2 import KeyspaceV2
from store.etcd import TlsFiles

CA_NAME = "etcd"
#: etcd's own administrator (no prefix in front of it).
ROOT = "root"
#: The other users of a cluster on the default prefix (schemas.acl's roles, one user each).
ORCHESTRATOR = "orchestrator"
OPERATOR = "operator"
MONITORING = "monitoring"


def user(kind: RoleKind, prefix: str = DEFAULT_PREFIX, node: str = "") -> str:
    """The etcd user (the certificate's CN) `vmha auth setup` makes for role ``kind`` of
    the cluster on ``prefix``: the role's name (``lab.a.operator`` on ``/lab/a``)."""
    return role_name(KeyspaceV2(prefix), RoleRef(kind, node))


def node_user(node: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The etcd user of node ``node``'s agent and guard."""
    return user("node", prefix, node)


@dataclass(frozen=True)
class EtcdPki:
    """The CA under ``root``'s ``pki-ca-etcd``; certificates are issued once and kept."""

    root: Path

    @property
    def dir(self) -> Path:
        return pki.ca_dir(self.root, CA_NAME)

    @property
    def cacert(self) -> str:
        return str(self.dir / "cacert.pem")

    def server(self, hosts: list[str]) -> EtcdServerTls:
        """etcd's certificate, valid for each address in ``hosts``, and the CA it trusts
        for clients; ``probe``, the root credential the readiness check logs in with."""
        pki.ensure_ca(self.dir, "vmha lab etcd CA")
        cert, key = self.dir / "server.pem", self.dir / "server-key.pem"
        if not cert.is_file():
            pki.issue(self.dir, cert, key, "vmha-lab-etcd",
                      [f"IP:{h}" for h in sorted(set(hosts))], "serverAuth")
        return EtcdServerTls(self.cacert, str(cert), str(key), probe=self.client(ROOT))

    def client(self, user: str) -> TlsFiles:
        """The TLS files of etcd user ``user`` (its certificate's CN)."""
        pki.ensure_ca(self.dir, "vmha lab etcd CA")
        cert = self.dir / "clients" / f"{user}.pem"
        key = self.dir / "clients" / f"{user}-key.pem"
        if not cert.is_file():
            cert.parent.mkdir(parents=True, exist_ok=True)
            pki.issue(self.dir, cert, key, user, [], "clientAuth")
        return TlsFiles(self.cacert, str(cert), str(key))


def cli_flags(tls: TlsFiles) -> list[str]:
    """``vmha``'s global options that log in with ``tls``."""
    assert tls.cert is not None and tls.key is not None
    return ["--etcd-cacert", tls.cacert, "--etcd-cert", tls.cert, "--etcd-key", tls.key]


def etcdctl_flags(tls: TlsFiles) -> list[str]:
    """etcdctl's options that log in with ``tls``."""
    assert tls.cert is not None and tls.key is not None
    return [f"--cacert={tls.cacert}", f"--cert={tls.cert}", f"--key={tls.key}"]
