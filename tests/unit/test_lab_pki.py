"""The lab's certificate authority (lab.pki): what libvirt and QEMU will be shown."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lab import pki

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _verify(ca: Path, cert: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", "verify", "-CAfile", str(ca), *extra, str(cert)],
                          capture_output=True, text=True, check=False)


def test_node_certificates_name_the_node_and_only_its_ca_signs_them(tmp_path: Path) -> None:
    lab_ca, rogue_ca = pki.ca_dir(tmp_path, "lab"), pki.ca_dir(tmp_path, "rogue")
    pki.ensure_ca(lab_ca, "lab")
    pki.ensure_ca(rogue_ca, "rogue")
    etc = tmp_path / "n1-pki"
    pki.install_node_pki(etc, lab_ca, "n1", "127.77.0.1", "vmha-lab-n1")
    ca = etc / "CA" / "cacert.pem"
    for cert, purpose in ((etc / "libvirt" / "servercert.pem", "sslserver"),
                          (etc / "libvirt" / "clientcert.pem", "sslclient"),
                          (etc / "qemu" / "server-cert.pem", "sslserver"),
                          (etc / "qemu" / "client-cert.pem", "sslclient")):
        ok = _verify(ca, cert, "-purpose", purpose, "-verify_ip", "127.77.0.1")
        assert ok.returncode == 0, ok.stderr
        assert _verify(ca, cert, "-verify_ip", "127.77.0.2").returncode != 0  # another node
        assert _verify(rogue_ca / "cacert.pem", cert).returncode != 0
    subject = subprocess.run(["openssl", "x509", "-noout", "-subject", "-in",
                              str(etc / "libvirt" / "clientcert.pem")],
                             capture_output=True, text=True, check=True).stdout
    assert "CN = vmha-lab-n1" in subject  # what tls_allowed_dn_list (CN=vmha-lab-*) admits
    for key in (etc / "libvirt" / "private" / "serverkey.pem", etc / "qemu" / "client-key.pem"):
        assert key.stat().st_mode & 0o077 == 0
    assert sorted(d.name for d in pki.lab_ca_dirs(tmp_path)) == ["pki-ca-lab", "pki-ca-rogue"]
