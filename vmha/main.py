"""`vmha`'s entry point: the CLI's commands plus those of the lab and the benchmarks.

The CLI cannot import the lab or the benchmarks (they sit above it), so this module, the
top of the import layers, hands their command groups to the CLI.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from bench import outage
from cli import main as cli_main
from lab import commands as lab_commands


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main.main(argv, extra=(lab_commands.register, outage.register))


if __name__ == "__main__":
    sys.exit(main())
