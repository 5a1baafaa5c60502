"""A lab's own certificate authority and the TLS material of its nodes (openssl).

Encrypted migration (``migration_tls`` in the cluster config) needs, on every node, the
layout libvirt and QEMU read by default (docs/operator-guide.md, "Encrypted migration")::

    /etc/pki/CA/cacert.pem                  CA that signs every node (libvirtd)
    /etc/pki/libvirt/servercert.pem         this node's libvirtd, as a server
    /etc/pki/libvirt/private/serverkey.pem
    /etc/pki/libvirt/clientcert.pem         this node's libvirtd, as a p2p client
    /etc/pki/libvirt/private/clientkey.pem
    /etc/pki/qemu/ca-cert.pem               the same for QEMU's migration stream
    /etc/pki/qemu/server-cert.pem, server-key.pem, client-cert.pem, client-key.pem

A lab node keeps that tree in ``<node dir>/pki`` and its namespace bind-mounts it over
``/etc/pki``.  Certificates carry the node's address (and host name) as subject
alternative names: a peer checks them against the address it dialled.  Everything is
generated locally; nothing is downloaded.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

OPENSSL = "openssl"
#: A lab's CAs live in ``<lab root>/<CA_DIR_PREFIX><name>``.
CA_DIR_PREFIX = "pki-ca-"
#: Subject common names of the nodes' certificates; libvirtd's tls_allowed_dn_list
#: admits exactly this pattern.
CN_PREFIX = "vmha-lab-"
ALLOWED_DN = f"CN={CN_PREFIX}*"
_DAYS = "30"


class PkiError(RuntimeError):
    """openssl could not create a key or certificate."""


def ca_dir(root: Path, name: str) -> Path:
    return root / f"{CA_DIR_PREFIX}{name}"


def lab_ca_dirs(root: Path) -> list[Path]:
    """The CAs a lab created under ``root`` (its tear-down removes them)."""
    return [d for d in root.glob(f"{CA_DIR_PREFIX}*")
            if (d / "cacert.pem").is_file() and (d / "cakey.pem").is_file()]


def _openssl(*args: str, cwd: Path | None = None) -> None:
    proc = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True,
                          check=False, timeout=60)
    if proc.returncode != 0:
        raise PkiError(f"openssl {args[0]} failed: {proc.stderr.strip()[-500:]}")


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", str(path))
    path.chmod(0o600)


def ensure_ca(ca_dir: Path, name: str) -> Path:
    """The CA under ``ca_dir`` (created once): returns its certificate's path."""
    cert = ca_dir / "cacert.pem"
    if cert.is_file():
        return cert
    ca_dir.mkdir(parents=True, exist_ok=True)
    _key(ca_dir / "cakey.pem")
    _openssl("req", "-x509", "-new", "-key", str(ca_dir / "cakey.pem"), "-days", _DAYS,
             "-subj", f"/O=vmha lab/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", str(cert))
    return cert


def issue(ca_dir: Path, out_cert: Path, out_key: Path, cn: str, sans: list[str],
          usage: str) -> None:
    """A key and a certificate for ``cn`` signed by the CA in ``ca_dir`` (``usage``: the
    extended key usage; ``sans``: subject alternative names, none for a client)."""
    with tempfile.TemporaryDirectory(prefix="vmha-pki-") as tmp:
        work = Path(tmp)
        _key(work / "key.pem")
        _openssl("req", "-new", "-key", str(work / "key.pem"), "-subj", f"/CN={cn}",
                 "-out", str(work / "req.csr"))
        (work / "ext.cnf").write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment,keyAgreement\n"
            f"extendedKeyUsage={usage}\n"
            + (f"subjectAltName={','.join(sans)}\n" if sans else ""))
        _openssl("x509", "-req", "-in", str(work / "req.csr"), "-CA",
                 str(ca_dir / "cacert.pem"), "-CAkey", str(ca_dir / "cakey.pem"),
                 "-CAcreateserial", "-days", _DAYS, "-extfile", str(work / "ext.cnf"),
                 "-out", str(out_cert))
        out_key.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / "key.pem", out_key)
        out_key.chmod(0o600)


def install_node_pki(pki_dir: Path, ca_dir: Path, name: str, address: str,
                     hostname: str) -> None:
    """Write ``pki_dir`` (the node's ``/etc/pki``) signed by the CA in ``ca_dir``.

    Kept as is when it exists: a restarted node presents the same certificates.
    """
    if (pki_dir / "qemu" / "client-key.pem").is_file():
        return
    cn = f"{CN_PREFIX}{name}"
    sans = [f"IP:{address}", f"DNS:{hostname}"]
    libvirt_dir, qemu_dir = pki_dir / "libvirt", pki_dir / "qemu"
    for d in (pki_dir / "CA", libvirt_dir / "private", qemu_dir):
        d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ca_dir / "cacert.pem", pki_dir / "CA" / "cacert.pem")
    shutil.copyfile(ca_dir / "cacert.pem", qemu_dir / "ca-cert.pem")
    for role, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        cert = libvirt_dir / f"{role}cert.pem"
        key = libvirt_dir / "private" / f"{role}key.pem"
        issue(ca_dir, cert, key, cn, sans, usage)
        # QEMU reads its own file names; the same identity serves both daemons.
        shutil.copyfile(cert, qemu_dir / f"{role}-cert.pem")
        shutil.copyfile(key, qemu_dir / f"{role}-key.pem")
        (qemu_dir / f"{role}-key.pem").chmod(0o600)
