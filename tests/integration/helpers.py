from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def domain_record(root: Path, node: str, vm: str) -> dict[str, Any] | None:
    p = root / node / "domains" / f"{vm}.json"
    try:
        return dict(json.loads(p.read_text()))
    except (FileNotFoundError, ValueError):
        return None
