"""systemd units, TOML config files and Prometheus metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.fake import fake_ground_truth
from lab.localcluster import free_ports
from tests.conftest import make_fake_cluster, vmha
from tests.harness import EtcdCluster, FakeCluster, wait_until
from tests.integration.keyspaces import KEYSPACES

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))


def _units_for_this_machine(tmp_path: Path) -> list[Path]:
    """The shipped units with ExecStart pointing at this venv's real `vmha`."""
    exe = Path(sys.executable).with_name("vmha")
    assert exe.exists()
    out = []
    for unit in UNITS:
        p = tmp_path / unit.name
        p.write_text(unit.read_text().replace("/usr/local/bin/vmha", str(exe)))
        out.append(p)
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_units_verify_and_security_exposure(tmp_path: Path) -> None:
    units = _units_for_this_machine(tmp_path)
    assert {u.name for u in units} == {"vmha-agent.service", "vmha-guard.service",
                                       "vmha-orchestrator.service"}
    r = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    scores = {}
    for u in units:
        r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(u)],
                           capture_output=True, text=True)
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
        assert m, r.stdout + r.stderr
        scores[u.name] = float(m.group(1))
    print("exposure:", scores)
    assert scores["vmha-orchestrator.service"] <= 1.0
    assert scores["vmha-agent.service"] <= 2.0
    assert scores["vmha-guard.service"] <= 2.0
    text = (ROOT / "deploy/systemd/vmha-agent.service").read_text()
    assert "Type=notify" in text and "TimeoutStopSec=15min" in text
    assert "After=network-online.target libvirtd.service" in text


def _directives(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_guard_unit_outlives_the_agent_unit() -> None:
    """The guard is its own service: ordered before the agent, never stopped with it, and
    the agent's restart timing fits within the guard's timeout."""
    from fencing.policy import guard_timeout
    from schemas.models import ClusterConfig

    agent = _directives(ROOT / "deploy/systemd/vmha-agent.service")
    guard = _directives(ROOT / "deploy/systemd/vmha-guard.service")
    assert "vmha-guard.service" in agent["After"][0].split()
    assert "vmha-guard.service" in agent["Wants"][0].split()
    for binding in ("PartOf", "BindsTo", "Requires", "StopPropagatedFrom"):
        assert binding not in guard, binding  # stopping the agent leaves the guard alone
    assert "vmha guard" in guard["ExecStart"][0] and guard["Restart"] == ["always"]
    assert guard["RuntimeDirectory"] == ["vmha"] and guard["RuntimeDirectoryPreserve"] == ["yes"]
    assert agent["KillMode"] == ["mixed"] and agent["RestartForceExitStatus"] == ["75"]
    restart_s = float(agent["RestartSec"][0].removesuffix("ms")) / 1000
    assert restart_s < guard_timeout(ClusterConfig()) / 4
    # The agent's drain gives up (destroy, revoke, exit) before systemd's SIGKILL.
    import tomllib

    agent_toml = tomllib.loads((ROOT / "deploy/etc/agent.toml").read_text())
    assert agent_toml["drain_timeout_s"] < 15 * 60 - 60 and agent["TimeoutStopSec"] == ["15min"]
    assert agent_toml["guard_socket"] == "/run/vmha/guard.sock"
    guard_toml = tomllib.loads((ROOT / "deploy/etc/guard.toml").read_text())
    assert guard_toml["socket"] == agent_toml["guard_socket"]
    from cli.daemons import AGENT_KEYS, GUARD_KEYS

    assert set(agent_toml) <= AGENT_KEYS and set(guard_toml) <= GUARD_KEYS


def test_units_least_privilege() -> None:
    """What the exposure score does not show: who each service runs as, and that each
    can still do its job (docs/operator-guide.md, "Service hardening")."""
    agent = _directives(ROOT / "deploy/systemd/vmha-agent.service")
    guard = _directives(ROOT / "deploy/systemd/vmha-guard.service")
    orch = _directives(ROOT / "deploy/systemd/vmha-orchestrator.service")
    # The agent: its own user, libvirt through the libvirt group, no capability, no device.
    assert agent["User"] == ["vmha"] and agent["SupplementaryGroups"] == ["libvirt"]
    assert agent["CapabilityBoundingSet"] == [""] and agent["PrivateDevices"] == ["yes"]
    assert "/run/libvirt" in agent["ReadWritePaths"][0].split()
    for unit in (agent, guard, orch):
        assert unit["PrivateMounts"] == ["yes"] and unit["NoNewPrivileges"] == ["yes"]
        assert unit["SystemCallFilter"][0] == "@system-service"
        assert unit["IPAddressDeny"] == ["any"]
    for unit in (agent, orch):
        assert unit["ProtectProc"] == ["invisible"] and unit["IPAddressAllow"] == ["localhost"]
    # The guard: root for the watchdog and the libvirt socket, CAP_KILL for a frozen
    # agent of another user, only the watchdog devices; its socket shared with vmha.
    assert "User" not in guard and guard["Group"] == ["vmha"]
    assert guard["CapabilityBoundingSet"] == ["CAP_KILL"]
    # Network only to etcd, for holding a restarting agent's lease (guard.toml hold_lease).
    assert guard["IPAddressAllow"] == ["localhost"] and "PrivateNetwork" not in guard
    assert guard["DevicePolicy"] == ["closed"]
    assert guard["DeviceAllow"] == ["/dev/watchdog rw", "char-watchdog rw"]
    import tomllib

    assert tomllib.loads((ROOT / "deploy/etc/guard.toml").read_text())["socket_group"] == (
        agent["Group"][0])
    users = (ROOT / "deploy/sysusers.d/vmha.conf").read_text().split("\n")
    assert "m vmha libvirt" in users and any(u.startswith("u vmha ") for u in users)


def test_config_files_validate_and_apply(etcd: EtcdCluster, tmp_path: Path) -> None:
    r = vmha(etcd, "config", "validate", "--file", str(ROOT / "deploy/etc/cluster.toml"))
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("lease_ttl_s = 2\nself_fence_safety_s = 1.9\n")
    r = vmha(etcd, "config", "apply", "--file", str(bad))
    assert r.returncode == 2 and "self_fence_safety_s" in r.stderr and "refused" in r.stderr
    r = vmha(etcd, "config", "apply", "--file", str(ROOT / "deploy/etc/cluster.toml"))
    assert r.returncode == 0, r.stderr
    typo = tmp_path / "agent.toml"
    typo.write_text('name = "n1"\nlibvirt_url = "qemu:///system"\n')
    r = vmha(etcd, "agent", "--config", str(typo), "--validate-config")
    assert r.returncode == 2 and "libvirt_url" in r.stderr


@pytest.fixture
def fc(etcd: EtcdCluster, tmp_path: Path, keyspace: int) -> Iterator[FakeCluster]:
    """The fake cluster on `keyspace` (tests/integration/keyspaces.py)."""
    cluster = make_fake_cluster(etcd, tmp_path, keyspace=keyspace)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.parametrize("keyspace", KEYSPACES)
def test_metrics_endpoints(etcd: EtcdCluster, fc: FakeCluster) -> None:
    p_orch, p_agent = free_ports(2)
    fc.start_agent("n1", extra=("--metrics-listen", f"127.0.0.1:{p_agent}"))
    fc.start_orchestrator("o1", extra=("--metrics-listen", f"127.0.0.1:{p_orch}"))
    assert vmha(etcd, "vm", "add", "m1", "--memory-mib", "64").returncode == 0
    wait_until(lambda: fake_ground_truth(fc.fake_root).get("m1"), 15, what="m1 running")

    def scrape(port: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            return str(resp.read().decode())

    wait_until(lambda: 'vmha_vms{state="running"} 1.0' in scrape(p_orch), 10,
               what="leader metrics")
    orch = scrape(p_orch)
    assert re.search(r"^vmha_leader_epoch [1-9]", orch, re.M)
    assert "vmha_placement_decision_seconds_count" in orch
    assert 'vmha_placements_total{kind="boot",written="true"} 1.0' in orch
    wait_until(lambda: 'vmha_lease_renew_seconds_count{who="agent"}' in scrape(p_agent), 10,
               what="agent renewals")
    agent = scrape(p_agent)
    assert "vmha_boots_total 1.0" in agent
    assert 'vmha_node_domains{state="running"} 1.0' in agent
