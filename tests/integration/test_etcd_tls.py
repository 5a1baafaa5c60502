"""TLS (with client certificates) between vmha and etcd."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.localcluster import free_ports
from store.etcd import EtcdStore, StoreUnavailable, TlsFiles

pytestmark = pytest.mark.integration


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=vmha-ca",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
                f"{name}.key", "-out", f"{name}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext", "-out",
                f"{name}.pem", cwd=d)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")
def test_store_and_cli_over_tls_with_client_certs(tmp_path: Path) -> None:
    make_pki(tmp_path)
    client_port, peer_port = free_ports(2)
    ep = f"127.0.0.1:{client_port}"
    proc = subprocess.Popen(
        ["etcd", "--name", "t", "--data-dir", str(tmp_path / "data"),
         "--listen-client-urls", f"https://{ep}", "--advertise-client-urls", f"https://{ep}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
         "--initial-cluster", f"t=http://127.0.0.1:{peer_port}",
         "--cert-file", str(tmp_path / "server.pem"), "--key-file", str(tmp_path / "server.key"),
         "--trusted-ca-file", str(tmp_path / "ca.pem"), "--client-cert-auth",
         "--log-level", "warn", "--logger", "zap"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        tls = TlsFiles(str(tmp_path / "ca.pem"), str(tmp_path / "client.pem"),
                       str(tmp_path / "client.key"))
        store = EtcdStore(ep, tls=tls)
        deadline = time.monotonic() + 10
        while True:
            try:
                store.put("/vmha/tls-check", "ok")
                break
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
        assert store.get("/vmha/tls-check").value == b"ok"  # type: ignore[union-attr]
        # The keepalive's own channels (store.keepalive) use the same TLS files.
        assert store.keepalive(store.grant_lease(30)) > 0
        # Without a client certificate etcd refuses us.
        no_client = EtcdStore(ep, tls=TlsFiles(str(tmp_path / "ca.pem")), retry_budget=0.5)
        with pytest.raises(StoreUnavailable):
            no_client.get("/vmha/tls-check")
        # The CLI takes the same files.
        r = subprocess.run(
            [*vmha_base(), "--etcd", ep, "--etcd-cacert", str(tmp_path / "ca.pem"),
             "--etcd-cert", str(tmp_path / "client.pem"), "--etcd-key",
             str(tmp_path / "client.key"), "vm", "add", "t1", "--memory-mib", "64"],
            capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert store.get("/vmha/vms/t1/spec") is not None
        store.close()
    finally:
        proc.kill()
        proc.wait(10)


def vmha_base() -> list[str]:
    return [sys.executable, "-m", "vmha"]


def test_cli_refuses_cert_without_ca() -> None:
    r = subprocess.run([*vmha_base(), "--etcd-cert", "x.pem", "--etcd-key", "x.key", "vm",
                        "list"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--etcd-cacert" in r.stderr
