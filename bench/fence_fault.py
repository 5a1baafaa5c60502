"""A fence agent for the fault campaign: ClusterLabs convention, with injectable faults.

Reads key=value lines on stdin like any fence agent.  `mode_file=PATH` names a file
holding one word: `ok` (behave like fencing.fence_vmha), `fail` (exit 1) or `hang`
(sleep far past any timeout).  Everything else is passed on to fencing.fence_vmha.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path


def main() -> int:
    text = sys.stdin.read()
    params = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    mode = "ok"
    if params.get("mode_file"):
        try:
            mode = Path(params["mode_file"]).read_text().strip() or "ok"
        except OSError:
            mode = "ok"
    if mode == "hang":
        time.sleep(3600)
    if mode == "fail":
        print("fence_fault: injected failure")
        return 1
    from fencing import fence_vmha

    sys.stdin = io.StringIO(text)
    return fence_vmha.main()


if __name__ == "__main__":
    sys.exit(main())
