"""`vmha completion SHELL`: a completion script for the whole parser."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_completion(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`source <(vmha completion bash)`, or save it under /etc/bash_completion.d/vmha."""
    import shtab

    print(shtab.complete(parser, shell=args.shell))
    return 0


def register(groups: dict[str, Any]) -> None:
    parser = groups["parser"]  # complete when the command runs: every group is in by then
    comp = groups["root"].add_parser("completion", help="print a shell completion script")
    comp.add_argument("shell", choices=["bash", "zsh", "tcsh"])
    comp.set_defaults(fn=lambda a: cmd_completion(a, parser))
