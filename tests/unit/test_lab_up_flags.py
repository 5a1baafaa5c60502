"""`vmha lab up`'s auth flags: auth is the default (no flag: None, which `up` turns into
auth for a new lab and into "as it is" for a running one), `--no-auth` turns it off,
`--auth` is still accepted for scripts, and the two exclude each other."""

from __future__ import annotations

import pytest

from bench import outage
from cli.main import build_parser
from lab import commands as lab_commands


def parse(*argv: str) -> object:
    return build_parser((lab_commands.register, outage.register)).parse_args(
        ["lab", "up", *argv]).auth


def test_auth_flags() -> None:
    assert parse() is None
    assert parse("--no-auth") is False
    assert parse("--auth") is True


def test_auth_and_no_auth_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse("--auth", "--no-auth")
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
