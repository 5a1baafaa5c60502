"""The guard service (fencing.guard_server) on the fake hypervisor: it outlives the agent
process, keeps the deadline across disconnects and accepts a new agent that re-attaches."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fencing.guard_client import SocketGuardClient
from fencing.lease_hold import LeaseTerms
from fencing.policy import guard_timeout, self_fence_deadline
from hypervisor.fake import FakeHypervisor, fake_ground_truth, pid_alive
from lab.configs import FAST_CONFIG
from store.etcd import EtcdStore
from tests.fencing.procs import popen as _popen
from tests.fencing.procs import service_fired, service_released_and_stopped
from tests.harness import EtcdCluster, wait_until

XML = "<domain><name>{0}</name></domain>"


def start_service(tmp: Path, *extra: str, etcd_endpoints: str | None = None,
                  grace_s: float = 20.0) -> tuple[subprocess.Popen[bytes], str]:
    sock = str(tmp / "guard.sock")
    if etcd_endpoints is None:
        args = [sys.executable, "-m", "fencing.guard", "--socket", sock,
                "--uri", f"fake://{tmp / 'n1'}", *extra]
    else:  # as vmha-guard.service runs it, holding the lease for a restarting agent
        args = [sys.executable, "-m", "vmha", "--etcd", etcd_endpoints, "guard",
                "--fake-root", str(tmp), "--name", "n1", "--socket", sock, "--hold-lease",
                "--restart-grace-s", str(grace_s), "--log-format", "json", *extra]
    g = _popen(args, stderr=subprocess.PIPE)
    wait_until(lambda: Path(sock).exists() and (tmp / "n1" / "host.pid").exists()
               and (tmp / "n1" / "host.pid").read_text() == str(g.pid), 10, what="guard up")
    hv = FakeHypervisor(tmp, "n1", host_pid=g.pid)
    hv.boot("vm1", XML.format("vm1"))
    assert fake_ground_truth(tmp) == {"vm1": ["n1"]}
    return g, sock


def raw_pet(s: socket.socket, deadline_in: float, timeout: float) -> None:
    s.sendall(f"pet {time.monotonic() + deadline_in} {timeout}\n".encode())


def test_not_reattached_in_time_the_guard_destroys_the_domains(tmp_path: Path) -> None:
    g, sock = start_service(tmp_path)
    client = SocketGuardClient(sock, "n1")
    assert client.pid == g.pid and not client.was_armed
    client.pet(time.monotonic() + 10.0, 0.6)
    client.close()  # the agent died without disarming: the deadline stays armed
    time.sleep(0.2)
    assert g.poll() is None and fake_ground_truth(tmp_path) == {"vm1": ["n1"]}
    service_fired(g, tmp_path / "n1")
    assert service_released_and_stopped(g, tmp_path / "n1") == 0
    assert fake_ground_truth(tmp_path) == {}
    err = g.stderr.read().decode() if g.stderr else ""
    assert '"agent_disconnected"' in err and '"guard_fired"' in err and '"vm1"' in err
    assert '"guard_unfenced"' in err


def test_a_new_agent_that_reattaches_before_the_deadline_keeps_the_domains(
        tmp_path: Path) -> None:
    g, sock = start_service(tmp_path)
    first = SocketGuardClient(sock, "n1")
    first.pet(time.monotonic() + 10.0, 0.8)
    first.close()
    time.sleep(0.4)
    second = SocketGuardClient(sock, "n1")  # the restarted agent process
    assert second.was_armed  # it learns the deadline is still armed
    for _ in range(10):  # well past the first agent's deadline
        second.pet(time.monotonic() + 10.0, 0.8)
        time.sleep(0.15)
    assert g.poll() is None and fake_ground_truth(tmp_path) == {"vm1": ["n1"]}
    second.disarm()
    time.sleep(1.0)
    assert g.poll() is None and fake_ground_truth(tmp_path) == {"vm1": ["n1"]}
    g.terminate()  # disarmed: a stop ends it at once, cleanly
    assert g.wait(5) == 0


def test_the_deadline_carried_by_the_pet_wins_and_a_frozen_agent_is_killed(
        tmp_path: Path) -> None:
    g, sock = start_service(tmp_path)
    agent = _popen([sys.executable, "-c", "import socket,sys,time\n"
                    "s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
                    "s.sendall(b'hello n1\\n'); s.recv(100)\n"
                    "s.sendall(f'pet {time.monotonic()+0.3} 30\\n'.encode())\n"
                    "time.sleep(60)\n", sock])
    service_fired(g, tmp_path / "n1")
    assert agent.wait(5) == -9  # still connected when the guard fired: SIGKILLed
    wait_until(lambda: fake_ground_truth(tmp_path) == {}, 5, what="domains destroyed")


def test_stop_while_armed_without_agent_is_deferred_until_disarm(tmp_path: Path) -> None:
    g, sock = start_service(tmp_path)
    c = SocketGuardClient(sock, "n1")
    c.pet(time.monotonic() + 30.0, 30.0)
    c.close()  # the agent is gone: the guard is the only fence left
    time.sleep(0.2)
    g.terminate()
    time.sleep(0.5)
    assert g.poll() is None and fake_ground_truth(tmp_path) == {"vm1": ["n1"]}
    c = SocketGuardClient(sock, "n1")  # a new agent attaches, drains, disarms
    assert c.was_armed
    c.disarm()
    assert g.wait(5) == 0


def test_stop_while_an_agent_is_attached_restarts_the_guard_under_it(tmp_path: Path) -> None:
    """`systemctl restart vmha-guard`: the attached agent keeps its own deadline and
    re-attaches to the new guard on its next pet, which arms it again."""
    g, sock = start_service(tmp_path)
    c = SocketGuardClient(sock, "n1")
    c.pet(time.monotonic() + 30.0, 30.0)
    g.terminate()
    assert g.wait(5) == 0
    g2, _ = start_service(tmp_path / "again")  # what Restart=always does (fresh host dir)
    c.path = str(tmp_path / "again" / "guard.sock")
    assert c.pet(time.monotonic() + 10.0, 0.5)  # reconnects, hello, pet
    assert c.pid == g2.pid
    c.close()
    # armed by the re-attached agent's pet
    service_fired(g2, tmp_path / "again" / "n1")


def test_the_service_holds_the_watchdog_and_releases_it_only_when_disarmed(
        tmp_path: Path) -> None:
    """/dev/watchdog is absent here: a plain file stands in (the timeout ioctl fails)."""
    dev = tmp_path / "watchdog"
    dev.write_bytes(b"")
    g, sock = start_service(tmp_path, "--watchdog", str(dev))
    c = SocketGuardClient(sock, "n1")
    c.pet(time.monotonic() + 10.0, 0.5)
    c.close()
    service_fired(g, tmp_path / "n1")
    data = dev.read_bytes()
    assert data and set(data) == {0}, data  # fed, never released with "V": the host resets
    # The node's agent registered again: the guard holds the watchdog again (a fresh
    # open), and a stop while disarmed releases it.
    assert service_released_and_stopped(g, tmp_path / "n1") == 0
    assert dev.read_bytes().endswith(b"V")
    dev.write_bytes(b"")
    g2, sock2 = start_service(tmp_path / "b", "--watchdog", str(dev))
    g2.terminate()  # never armed: a clean stop with the magic close
    assert g2.wait(5) == 0
    assert dev.read_bytes().endswith(b"V")
    assert not pid_alive(g2.pid)


def agent_gone(store: EtcdStore, sock: str, alive: bool = False) -> list[int]:
    """An agent that registered a lease (and a liveness lease with `alive`), told the
    guard about them, petted and was then SIGKILLed; its leases."""
    cfg = FAST_CONFIG
    sent = time.monotonic()
    leases = [store.grant_lease(cfg.lease_ttl_s)]
    if alive:
        leases.append(store.grant_lease(cfg.lease_ttl_s))
    agent = SocketGuardClient(sock, "n1")
    agent.announce(LeaseTerms.of(*leases[:1], cfg, *leases[1:]))
    agent.pet(self_fence_deadline(sent, cfg), guard_timeout(cfg))
    agent.close()
    return leases


@pytest.mark.parametrize("alive", [True, False], ids=["with-liveness", "registration-only"])
def test_the_service_holds_the_lease_for_a_restarting_agent_up_to_the_grace(
        etcd: EtcdCluster, tmp_path: Path, alive: bool) -> None:
    """An agent process gone longer than the guard's timeout (a slow restart on a loaded
    host): the guard service renews its leases meanwhile (the registration's and the
    liveness lease; terms without the latter still work), so the VMs stay; once the
    grace is over with no agent back, it fires after the last renewal's timeout, and
    the leases then expire in etcd."""
    store = EtcdStore(etcd.endpoints)
    cfg = FAST_CONFIG
    g, sock = start_service(tmp_path, etcd_endpoints=etcd.endpoints, grace_s=4.0)
    try:
        leases = agent_gone(store, sock, alive)  # no new process yet
        time.sleep(guard_timeout(cfg) + 1.0)  # past the last pet's timeout and the TTL
        assert guard_timeout(cfg) + 1.0 > cfg.lease_ttl_s
        assert g.poll() is None and fake_ground_truth(tmp_path) == {"vm1": ["n1"]}
        assert [store.lease_ttl(lease) > 0 for lease in leases] == [True] * len(leases)
        service_fired(g, tmp_path / "n1", within=30)  # the grace (4 s) ran out: fired
        wait_until(lambda: fake_ground_truth(tmp_path) == {}, 5, what="domains destroyed")
        wait_until(lambda: all(store.lease_ttl(lease) <= 0 for lease in leases),
                   cfg.lease_ttl_s + 3,
                   what="the leases expired after the guard stopped renewing")
        assert service_released_and_stopped(g, tmp_path / "n1") == 0
        err = g.stderr.read().decode() if g.stderr else ""
        assert '"lease_hold_started"' in err and '"lease_hold_ended"' in err
    finally:
        store.close()


def test_an_agent_that_pets_again_ends_the_hold(etcd: EtcdCluster, tmp_path: Path) -> None:
    store = EtcdStore(etcd.endpoints)
    cfg = FAST_CONFIG
    g, sock = start_service(tmp_path, etcd_endpoints=etcd.endpoints, grace_s=30.0)
    try:
        agent_gone(store, sock)
        time.sleep(guard_timeout(cfg) + 0.5)
        # The restarted agent, late, pets once and then freezes (its own process: the
        # guard SIGKILLs the agents attached when it fires).
        second = _popen([sys.executable, "-c", "import socket,sys,time\n"
                         "s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
                         "s.sendall(b'hello n1\\n'); s.recv(100)\n"
                         "s.sendall(f'pet {time.monotonic()+1.0} 0.8\\n'.encode())\n"
                         "time.sleep(60)\n", sock])
        # An agent is attached again: the hold is over, so the new pet's deadline rules.
        # (generous: the second process's start on a loaded host)
        service_fired(g, tmp_path / "n1", within=30)
        assert second.wait(10) == -9
        assert service_released_and_stopped(g, tmp_path / "n1") == 0
        err = g.stderr.read().decode() if g.stderr else ""
        assert '"lease_hold_ended"' in err and "an agent petted" in err
        assert '"agent_reattached"' in err
    finally:
        store.close()


def test_lease_terms_carry_the_liveness_lease_on_a_line_of_its_own() -> None:
    terms = LeaseTerms.of(0xAB, FAST_CONFIG, 0xCD)
    lease, alive = terms.line().split("\n")
    assert LeaseTerms.parse(lease.split()[1:]).with_alive(alive.split()[1:]) == terms
    # Without a liveness lease: the one line a guard without `alive` understands.
    assert LeaseTerms.of(0xAB, FAST_CONFIG).line() == lease
    for bad in ([], ["0"], ["ab", "cd"]):
        with pytest.raises(ValueError):
            terms.with_alive(bad)
