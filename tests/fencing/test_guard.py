"""The guard process on the fake hypervisor: it fences the host when petting stops."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from hypervisor.fake import FakeHypervisor, fake_ground_truth, pid_alive
from tests.fencing.procs import fired_then_released
from tests.fencing.procs import popen as _popen
from tests.harness import wait_until

XML = "<domain><name>{0}</name></domain>"


def start_guard(tmp: Path, agent_pid: int, linger: float = 0.0) -> subprocess.Popen[bytes]:
    g = _popen([sys.executable, "-m", "fencing.guard", "--agent-pid", str(agent_pid),
                          "--uri", f"fake://{tmp / 'n1'}", "--linger", str(linger)],
                         stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until(lambda: (tmp / "n1" / "host.pid").exists()
               and (tmp / "n1" / "host.pid").read_text() == str(g.pid), 10, what="guard up")
    return g


def pet(g: subprocess.Popen[bytes], deadline_in: float, timeout: float) -> None:
    assert g.stdin is not None
    g.stdin.write(f"pet {time.monotonic() + deadline_in} {timeout}\n".encode())
    g.stdin.flush()


def setup(tmp: Path, linger: float = 0.0) -> tuple[subprocess.Popen[bytes],
                                                   subprocess.Popen[bytes], FakeHypervisor]:
    agent = _popen(["sleep", "60"])
    g = start_guard(tmp, agent.pid, linger)
    hv = FakeHypervisor(tmp, "n1", host_pid=g.pid)
    hv.boot("vm1", XML.format("vm1"))
    assert fake_ground_truth(tmp) == {"vm1": ["n1"]}
    return agent, g, hv


def test_guard_outlives_a_stopped_agent_then_kills_it_and_destroys_domains(
        tmp_path: Path) -> None:
    agent, g, _ = setup(tmp_path)
    agent.send_signal(19)  # SIGSTOP: a frozen agent
    pet(g, 10.0, 0.5)
    t0 = time.monotonic()
    assert fired_then_released(g, tmp_path / "n1") == 3
    took = time.monotonic() - t0
    assert 0.4 <= took < 2.0, took
    assert agent.wait(5) == -9  # SIGKILLed even though stopped: it can never resume
    assert fake_ground_truth(tmp_path) == {}
    err = g.stderr.read().decode() if g.stderr else ""
    assert '"guard_fired"' in err and '"vm1"' in err


def test_guard_fires_at_the_deadline_carried_by_the_pet(tmp_path: Path) -> None:
    agent, g, _ = setup(tmp_path)
    pet(g, 0.3, 30.0)
    t0 = time.monotonic()
    assert fired_then_released(g, tmp_path / "n1") == 3
    assert time.monotonic() - t0 < 1.5
    assert agent.wait(5) == -9


def test_regular_pets_keep_it_quiet_and_eof_keeps_it_armed(tmp_path: Path) -> None:
    agent, g, _ = setup(tmp_path)
    for _ in range(10):
        pet(g, 10.0, 0.5)
        time.sleep(0.1)
    assert g.poll() is None and fake_ground_truth(tmp_path) == {"vm1": ["n1"]}
    assert g.stdin is not None
    g.stdin.close()  # the agent died (kill -9): the pipe closes, the guard still fires
    assert fired_then_released(g, tmp_path / "n1") == 3
    assert fake_ground_truth(tmp_path) == {}
    agent.wait(5)


def test_disarm_leaves_guests_alone(tmp_path: Path) -> None:
    agent, g, _ = setup(tmp_path)
    pet(g, 10.0, 0.5)
    assert g.stdin is not None
    g.stdin.write(b"disarm\n")
    g.stdin.close()
    assert g.wait(5) == 0
    assert pid_alive(agent.pid)
    agent.kill()
    agent.wait()


def test_never_armed_guard_lingers_and_leaves_the_guests_running(tmp_path: Path) -> None:
    agent, g, _ = setup(tmp_path, linger=1.0)
    assert g.stdin is not None
    g.stdin.close()
    time.sleep(0.5)
    assert g.poll() is None and fake_ground_truth(tmp_path) == {"vm1": ["n1"]}
    assert g.wait(5) == 0
    # A guard that never fired destroys nothing: its exit leaves the guests running,
    # as QEMU outlives any vmha process.
    assert fake_ground_truth(tmp_path) == {"vm1": ["n1"]}
    assert pid_alive(agent.pid)
    agent.kill()
    agent.wait()


def test_watchdog_is_fed_while_armed_and_released_with_magic_close(tmp_path: Path) -> None:
    """/dev/watchdog is absent here: a plain file stands in (the timeout ioctl fails, logged)."""
    from fencing.guard import Watchdog

    dev = tmp_path / "watchdog"
    dev.write_bytes(b"")
    wd = Watchdog(str(dev), 10)
    wd.feed()
    wd.feed()
    wd.close(disarm=True)
    assert dev.read_bytes() == b"\0\0V"
    dev.write_bytes(b"")
    wd = Watchdog(str(dev), 10)
    wd.feed()
    wd.close(disarm=False)  # fired: no magic close, a real watchdog resets the host
    assert dev.read_bytes() == b"\0"


def test_guard_feeds_the_watchdog_then_stops_when_it_fires(tmp_path: Path) -> None:
    dev = tmp_path / "watchdog"
    dev.write_bytes(b"")
    agent = _popen(["sleep", "60"])
    g = _popen([sys.executable, "-m", "fencing.guard", "--agent-pid", str(agent.pid),
                          "--uri", f"fake://{tmp_path / 'n1'}", "--watchdog", str(dev)],
                         stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.5)
    pet(g, 10.0, 0.5)
    assert fired_then_released(g, tmp_path / "n1") == 3
    data = dev.read_bytes()
    assert data and set(data) == {0}, data  # fed while armed, never released with "V"
    assert agent.wait(5) == -9
