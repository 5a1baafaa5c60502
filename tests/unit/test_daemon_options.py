"""Daemon options: a TOML file fills what the command line does not set explicitly."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cli.daemons import AGENT_KEYS, load_daemon_config
from cli.main import build_parser


def agent_args(tmp: Path, toml: str, *flags: str) -> argparse.Namespace:
    cfg = tmp / "agent.toml"
    cfg.write_text(toml)
    args = build_parser().parse_args(["agent", "--config", str(cfg), *flags])
    load_daemon_config(args, AGENT_KEYS)
    return args


def test_migration_address_from_toml_is_used(tmp_path: Path) -> None:
    args = agent_args(tmp_path, 'name = "n1"\nmigration_address = "10.0.1.21"\n')
    assert args.migration_address == "10.0.1.21"


@pytest.mark.parametrize("flag", ["10.0.9.9", "127.0.0.1"])
def test_migration_address_on_the_command_line_wins(tmp_path: Path, flag: str) -> None:
    # Even when it equals the built-in default: given explicitly, it is the operator's.
    args = agent_args(tmp_path, 'migration_address = "10.0.1.21"\n',
                      "--migration-address", flag)
    assert args.migration_address == flag


def test_migration_address_default(tmp_path: Path) -> None:
    from cli.daemons import agent_migration_address

    assert agent_migration_address(agent_args(tmp_path, 'name = "n1"\n')) == "127.0.0.1"
