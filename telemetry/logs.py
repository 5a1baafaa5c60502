"""structlog set-up: JSON lines in daemons, key=value on a terminal."""

from __future__ import annotations

import logging
import sys

import structlog

from schemas.secrets import REDACTED, is_secret_key


def redact_secrets(_logger: object, _method: str,
                   event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """A field named like a secret (password, passwd, secret, token) is never written."""
    for key in event:
        if is_secret_key(key):
            event[key] = REDACTED
    return event


def setup(fmt: str = "auto", level: str = "info") -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(sort_keys=False) if fmt == "json"
        else structlog.processors.LogfmtRenderer(key_order=["timestamp", "level", "event"]))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            redact_secrets,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
