from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hypervisor.fake import fake_ground_truth
from tests.harness import Daemon


def log_events(daemon: Daemon, event: str | None = None) -> list[dict[str, Any]]:
    out = []
    for line in daemon.log_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if event is None or rec.get("event") == event:
            out.append(rec)
    return out


class DoubleRunChecker:
    """Polls the fake hypervisor's ground truth (not vmha's view) for double runs."""

    def __init__(self, root: Path, interval: float = 0.01) -> None:
        self.root = root
        self.interval = interval
        self.violations: list[tuple[str, list[str]]] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for vm, nodes in fake_ground_truth(self.root).items():
                if len(nodes) > 1:
                    self.violations.append((vm, nodes))
            self.samples += 1
            time.sleep(self.interval)

    @contextmanager
    def running(self) -> Iterator[DoubleRunChecker]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(5)


def domain_record(root: Path, node: str, vm: str) -> dict[str, Any] | None:
    p = root / node / "domains" / f"{vm}.json"
    try:
        return dict(json.loads(p.read_text()))
    except (FileNotFoundError, ValueError):
        return None
