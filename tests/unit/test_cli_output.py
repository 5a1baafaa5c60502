"""stdout is a command's output: operators parse `vmha … -o json`, so a log line that any
module emits during a command goes to stderr, never between the JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from cli.main import main


@pytest.fixture
def default_structlog() -> Iterator[None]:
    # A command run first in a process meets structlog's defaults (print to stdout);
    # earlier tests may have configured it, so start from the defaults and put back.
    saved = structlog.get_config()
    structlog.reset_defaults()
    try:
        yield
    finally:
        structlog.configure(**saved)


def noisy(groups: dict[str, Any]) -> None:
    def run(args: argparse.Namespace) -> int:
        structlog.get_logger("vmha.test").warning("event_not_recorded", kind="boot")
        structlog.get_logger("vmha.test").info("chatter")
        print(json.dumps({"vms": []}))
        return 0

    groups["root"].add_parser("noisy").set_defaults(fn=run)


def test_a_command_s_log_lines_go_to_stderr_and_its_json_parses(
        default_structlog: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-o", "json", "noisy"], extra=[noisy]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"vms": []}
    assert "event_not_recorded" in err
    assert "chatter" not in out + err  # below warning: a command is not a daemon


def test_the_caller_s_logging_is_put_back(default_structlog: None) -> None:
    before = structlog.get_config()
    main(["-o", "json", "noisy"], extra=[noisy])
    assert structlog.get_config() == before
