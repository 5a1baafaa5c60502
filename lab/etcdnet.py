"""Network namespaces for a local etcd whose members can be cut off the network.

Each member runs in a namespace of its own, joined by a veth pair to a *rig* namespace
that routes between the members (``ip_forward``) and where their clients run (agents,
orchestrators, the benchmark).  Cutting a member off then looks like a host whose
cable was pulled: its peers and its clients get no FIN, RST or ICMP, only silence
until their own deadlines, and the member drops out of the raft cluster's view.

Addresses are 10.255.7.0/24 and exist only inside these namespaces; no namespace has a
default route, so nothing leaves them.  Member ``i`` is 10.255.7.(4i+2)/30, the rig's
side of its link 10.255.7.(4i+1)/30.

A cut is two nftables tables: in the rig namespace, ``input`` (the member's answers to
the rig's clients) and ``forward`` (every packet between the member and its peers); in
the member's namespace, ``input`` (what the rig's clients send it).  Nothing is dropped
in an ``output`` hook: a drop there fails the local sender's send with EPERM, which a
lost link never does.  Root only; needs ``nft`` (Debian's nftables, scripts/setup.sh).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass

from lab.netguest import delete_netns
from store.etcd import EtcdStore, StoreUnavailable

SUBNET = "10.255.7"
CUT_TABLE = "vmha_cutoff"


def _run(*argv: str) -> None:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")


def in_netns(name: str, argv: list[str]) -> list[str]:
    """``argv`` run inside the namespace ``name`` (``ip netns exec`` execs it: the pid
    is the command's own, so signals reach it directly)."""
    return ["ip", "netns", "exec", name, *argv]


def netns_usable() -> str | None:
    """Why this process cannot make network namespaces (``None``: it can)."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "no ip command (iproute2)"
    probe = f"vmha-probe-{os.getpid()}"
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          check=False)
    delete_netns(probe)
    return None if proc.returncode == 0 else f"ip netns add: {proc.stderr.strip()}"


@dataclass(frozen=True)
class EtcdNet:
    """The namespaces of one rig: ``PREFIX-rig`` and ``PREFIX-m0`` ... ``PREFIX-m<n-1>``."""

    prefix: str
    members: int = 3

    @property
    def rig(self) -> str:
        return f"{self.prefix}-rig"

    def member_ns(self, i: int) -> str:
        return f"{self.prefix}-m{i}"

    def member_ip(self, i: int) -> str:
        return f"{SUBNET}.{4 * i + 2}"

    def rig_ip(self, i: int) -> str:
        return f"{SUBNET}.{4 * i + 1}"

    def veth(self, i: int) -> str:
        return f"veth-m{i}"  # the rig's end; the member's end is eth0

    def namespaces(self) -> list[str]:
        return [self.rig, *(self.member_ns(i) for i in range(self.members))]

    def create(self) -> None:
        """Make the rig namespace and one namespace per member, linked and routed."""
        if self.members > 63:
            raise ValueError("at most 63 members fit 10.255.7.0/24 as /30 links")
        try:
            _run("ip", "netns", "add", self.rig)
            for key in ("all", "default"):
                _run(*in_netns(self.rig, ["sysctl", "-q", "-w",
                                          f"net.ipv6.conf.{key}.disable_ipv6=1"]))
            _run(*in_netns(self.rig, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]))
            _run("ip", "-n", self.rig, "link", "set", "lo", "up")
            for i in range(self.members):
                ns, veth = self.member_ns(i), self.veth(i)
                _run("ip", "netns", "add", ns)
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                _run("ip", "-n", self.rig, "link", "add", veth, "type", "veth", "peer",
                     "name", "eth0", "netns", ns)
                _run("ip", "-n", self.rig, "addr", "add", f"{self.rig_ip(i)}/30", "dev", veth)
                _run("ip", "-n", ns, "addr", "add", f"{self.member_ip(i)}/30", "dev", "eth0")
                _run("ip", "-n", self.rig, "link", "set", veth, "up")
                _run("ip", "-n", ns, "link", "set", "eth0", "up")
                # The other members (and nothing else) through the rig.
                _run("ip", "-n", ns, "route", "add", f"{SUBNET}.0/24", "via", self.rig_ip(i))
        except BaseException:
            self.delete()
            raise

    def delete(self) -> None:
        """Delete every namespace of the rig (those that exist; never fails)."""
        for ns in self.namespaces():
            delete_netns(ns)

    def run_inside(self, argv: list[str]) -> int:
        """Make the namespaces, run ``argv`` inside the rig namespace and return its exit
        code; every namespace is deleted afterwards, whatever happened (a Ctrl-C, or a
        SIGTERM the caller turns into KeyboardInterrupt, is forwarded to ``argv`` as
        SIGTERM, which it must handle, and waited for: SIGINT may be ignored, as in a
        shell's background job)."""
        self.create()
        try:
            # A session of its own: a Ctrl-C reaches it once, forwarded, and it has the
            # time to stop what it started before the namespaces go.
            inner = subprocess.Popen(in_netns(self.rig, argv), start_new_session=True)
            try:
                return inner.wait()
            except KeyboardInterrupt:
                inner.send_signal(signal.SIGTERM)
                inner.wait()
                raise
        finally:
            self.delete()

    def cut(self, i: int) -> None:
        """Silently drop every packet to and from member ``i`` (see the module's doc)."""
        veth = self.veth(i)
        _nft(self.rig, f"""table inet {CUT_TABLE} {{
  chain input {{ type filter hook input priority -10; policy accept; iifname "{veth}" drop; }}
  chain forward {{ type filter hook forward priority -10; policy accept;
    iifname "{veth}" drop; oifname "{veth}" drop; }}
}}""")
        _nft(self.member_ns(i), f"""table inet {CUT_TABLE} {{
  chain input {{ type filter hook input priority -10; policy accept; iifname "eth0" drop; }}
}}""")

    def heal(self, i: int) -> None:
        """Undo :meth:`cut` (either table may be missing after a failed cut)."""
        for ns in (self.rig, self.member_ns(i)):
            proc = subprocess.run(in_netns(ns, ["nft", "delete", "table", "inet", CUT_TABLE]),
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0 and "No such file or directory" not in proc.stderr:
                raise RuntimeError(f"nft in {ns}: {proc.stderr.strip()}")


def _nft(ns: str, ruleset: str) -> None:
    if shutil.which("nft") is None:
        raise RuntimeError("nft not found: install Debian's nftables (scripts/setup.sh)")
    proc = subprocess.run(in_netns(ns, ["nft", "-f", "-"]), input=ruleset, text=True,
                          capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"nft in {ns}: {proc.stderr.strip()}")


def probe_cut(host: str, port: int, timeout: float = 1.0) -> dict[str, str]:
    """What a client gets from an etcd member that should be cut off: ``timeout`` for
    both a TCP connect and an etcd read is a real cut; ``refused``, ``eperm`` (a drop in
    an output hook) or an answer is not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            tcp = "connected"
    except TimeoutError:
        tcp = "timeout"
    except ConnectionRefusedError:
        tcp = "refused"
    except PermissionError:
        tcp = "eperm"
    except OSError as exc:
        tcp = f"error: {exc}"
    store = EtcdStore(f"{host}:{port}", retry_budget=0.0, timeout=timeout)
    try:
        store.revision()
        read = "answered"
    except StoreUnavailable as exc:
        text = str(exc)
        read = ("timeout" if "DEADLINE_EXCEEDED" in text or "Timeout" in text
                else f"error: {text}")
    finally:
        store.close()
    return {"tcp": tcp, "read": read}
