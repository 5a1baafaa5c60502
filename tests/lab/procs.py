"""Running `vmha` commands that start labs, so that a failing test leaves nothing behind.

A command that outlives its time (or a test interrupted meanwhile) gets what a terminal
sends on Ctrl-C: SIGINT to its whole process group, so `vmha lab up`, `vmha demo` and
`vmha bench outage` run their own tear-down; whatever of the group is still there after
that is SIGKILLed.  (The daemons such a command starts run in sessions of their own and
are stopped by that tear-down; tests/leakcheck.py catches any that are not.)
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

VMHA = [sys.executable, "-m", "vmha"]
#: How long a Ctrl-C'ed command gets to tear its lab down.
TEARDOWN_S = 120.0


def interrupt_group(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C for ``proc``'s process group; SIGKILL for it if that does not end it."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(TEARDOWN_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def lab_env(lab: Path) -> dict[str, str]:
    """The environment `source <lab>/env.sh` gives a shell (its `export` lines)."""
    env = dict(os.environ)
    for line in (lab / "env.sh").read_text().splitlines():
        if line.startswith("export "):
            for pair in line[len("export "):].split():
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def run_vmha(*args: str, timeout: float = 120,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`vmha ARGS`, output captured; past ``timeout`` it is interrupted, then the
    ``TimeoutExpired`` is raised."""
    proc = subprocess.Popen([*VMHA, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        interrupt_group(proc)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class Lines:
    """A command's merged stdout/stderr, read line by line in a thread."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([*VMHA, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, needle: str, timeout: float) -> bool:
        """Read until a line contains ``needle`` (True) or the output ends (False).

        ``timeout`` only bounds a hang (then ``queue.Empty``): it is not a measurement."""
        while True:
            line = self._queue.get(timeout=timeout)
            if line is None:
                return False
            self.lines.append(line)
            if needle in line:
                return True

    def finish(self, timeout: float = TEARDOWN_S) -> str:
        """Wait for the command to end; the whole output."""
        self.proc.wait(timeout)
        self._pump.join(timeout)
        with contextlib.suppress(queue.Empty):
            while (line := self._queue.get_nowait()) is not None:
                self.lines.append(line)
        return "".join(self.lines)

    def close(self) -> None:
        """Interrupt the command if it still runs (a failed test)."""
        interrupt_group(self.proc)

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def lab_down_on_failure(lab_dir: str) -> Iterator[None]:
    """If the block fails, `vmha lab down` the lab it may have left in ``lab_dir``."""
    try:
        yield
    except BaseException:
        run_vmha("lab", "down", "--dir", lab_dir, timeout=TEARDOWN_S)
        raise
