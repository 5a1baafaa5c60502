"""A one-member etcd with TLS and client-certificate authentication, and a throwaway CA
that issues a client certificate for any common name (the etcd user it logs in as,
docs/keyspace-v2.md section 5).  `tests/conftest.py` makes the `etcd_tls` (auth off) and
`etcd_auth` (keyspace 2 marker written, `vmha auth setup` run) fixtures of it.

Keys are P-256 (openssl): a certificate takes milliseconds, so a test may issue as many
as it needs (a rotation's new CN)."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lab.localcluster import free_ports
from schemas.keys_v2 import KeyspaceV2
from schemas.models_v2 import KeyspaceVersion
from store.etcd import EtcdStore, StoreUnavailable, TlsFiles

KS2 = KeyspaceV2()
_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)


@dataclass
class Pki:
    """A CA in `dir`, the etcd server's certificate, and client certificates by CN."""

    dir: Path
    _issued: dict[str, TlsFiles] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _openssl(self.dir, "req", "-x509", *_EC, "-days", "1", "-subj", "/CN=vmha-test-ca",
                 "-keyout", "ca.key", "-out", "ca.pem")
        self._issue("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth")

    @property
    def ca(self) -> str:
        return str(self.dir / "ca.pem")

    def _issue(self, cn: str, ext: str) -> None:
        (self.dir / f"{cn}.ext").write_text(ext + "\n")
        _openssl(self.dir, "req", *_EC, "-subj", f"/CN={cn}", "-keyout", f"{cn}.key",
                 "-out", f"{cn}.csr")
        _openssl(self.dir, "x509", "-req", "-in", f"{cn}.csr", "-CA", "ca.pem", "-CAkey",
                 "ca.key", "-CAcreateserial", "-days", "1", "-extfile", f"{cn}.ext",
                 "-out", f"{cn}.pem")

    def client(self, cn: str) -> TlsFiles:
        """The TLS files of a client certificate with common name `cn` (issued once)."""
        if cn not in self._issued:
            self._issue(cn, "extendedKeyUsage=clientAuth")
            self._issued[cn] = TlsFiles(self.ca, str(self.dir / f"{cn}.pem"),
                                        str(self.dir / f"{cn}.key"))
        return self._issued[cn]


@dataclass
class TlsEtcd:
    """One etcd member serving TLS only to clients with a certificate of `pki`'s CA."""

    endpoint: str
    pki: Pki
    base: Path
    proc: subprocess.Popen[bytes]
    _stores: list[EtcdStore] = field(default_factory=list)

    def store(self, cn: str, retry_budget: float = 2.0) -> EtcdStore:
        """A store that logs in as etcd user `cn` (closed with the cluster)."""
        s = EtcdStore(self.endpoint, tls=self.pki.client(cn), retry_budget=retry_budget)
        self._stores.append(s)
        return s

    @property
    def root(self) -> EtcdStore:
        return self._stores[0]

    def cli_args(self, cn: str) -> list[str]:
        tls = self.pki.client(cn)
        assert tls.cert is not None and tls.key is not None
        return ["--etcd", self.endpoint, "--etcd-cacert", tls.cacert, "--etcd-cert", tls.cert,
                "--etcd-key", tls.key]

    def vmha(self, cn: str, *args: str) -> tuple[int, str, str]:
        """`vmha --etcd … ARGS` in this process as user `cn`: exit code, stdout, stderr."""
        from cli.main import main

        out, err = io.StringIO(), io.StringIO()
        # main() sends the command's logs to (this) stderr and puts the caller's back.
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([*self.cli_args(cn), *args])
        return code, out.getvalue(), err.getvalue()

    def mark_keyspace_2(self, state: str = "done") -> None:
        """What `vmha keyspace migrate` leaves (section 6): the marker, state `done`."""
        v = KeyspaceVersion(keyspace=2, state=state,  # type: ignore[arg-type]
                            started_at=time.time(), by="operator:test", tool_version="test")
        self.root.put(KS2.version, v.to_json())

    def stop(self) -> None:
        for s in self._stores:
            s.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        shutil.rmtree(self.base, ignore_errors=True)


def start_tls_etcd(extra: Sequence[str] = ()) -> TlsEtcd:
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    base = Path(tempfile.mkdtemp(prefix="vmha-etcd-auth-", dir=shm))
    pki = Pki(base)
    client_port, peer_port = free_ports(2)
    ep, peer = f"127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    log = open(base / "etcd.log", "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        ["etcd", "--name", "a", "--data-dir", str(base / "data"),
         "--listen-client-urls", f"https://{ep}", "--advertise-client-urls", f"https://{ep}",
         "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
         "--initial-cluster", f"a={peer}", "--cert-file", str(base / "server.pem"),
         "--key-file", str(base / "server.key"), "--trusted-ca-file", pki.ca,
         "--client-cert-auth", "--log-level", "warn", "--logger", "zap", *extra],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    cluster = TlsEtcd(ep, pki, base, proc)
    try:
        probe = EtcdStore(ep, tls=pki.client("root"), retry_budget=0.5)
        deadline = time.monotonic() + 15
        try:
            while True:
                try:
                    probe.revision()
                    break
                except StoreUnavailable:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
        finally:
            probe.close()
        cluster.store("root")  # the first store: `root`
    except BaseException:
        cluster.stop()
        raise
    return cluster
