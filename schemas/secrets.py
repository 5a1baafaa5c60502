"""Fence secrets and control characters: what may enter a fence agent's stdin, and what
is never shown.

A fence agent reads `key=value` lines on stdin, and ClusterLabs agents run some of them
through a shell (`password_script=`): a line break smuggled into a value is a new
parameter.  So no name, fence parameter or URI may hold a control character.

A parameter that is a secret (an IPMI or Redfish password) is not stored in etcd, which
every node can read: its value in the config is a reference, `{"credential": "NAME"}`,
and the orchestrator reads the file NAME from its credentials directory (systemd's
`LoadCredential=`, `$CREDENTIALS_DIRECTORY`) only when it runs the agent.  A plain value
whose key looks like a secret (`password`, `passwd`, `secret`, `token`) is accepted (a
`password_script` is a path) but redacted wherever vmha prints the config.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

REDACTED = "<redacted>"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SECRET_KEY = re.compile(r"passw|secret|token", re.IGNORECASE)
# A systemd credential name is a file name in $CREDENTIALS_DIRECTORY: no path.
_CREDENTIAL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,254}")


def control_char(value: str) -> str | None:
    """The first control character in `value`, written as "U+" and four hex digits
    (e.g. U+000A for a newline), or None."""
    m = _CONTROL.search(value)
    return f"U+{ord(m.group()):04X}" if m else None


def refuse_control(value: str, what: str) -> str:
    """`value`, or ValueError naming `what` and the character (never the value: it may
    be a secret)."""
    bad = control_char(value)
    if bad:
        raise ValueError(f"{what} contains a control character ({bad})")
    return value


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


class CredentialRef(BaseModel):
    """A fence parameter read from the file `credential` in the orchestrator's
    credentials directory when the agent runs."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    credential: str

    @field_validator("credential")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _CREDENTIAL_NAME.fullmatch(v):
            raise ValueError(f"credential name {v[:80]!r} must be 1-255 chars of A-Z, a-z, "
                             "0-9, '_', '.', '@', '-' (a file name in the credentials "
                             "directory) and not start with '.', '@' or '-'")
        return v


def check_param_key(key: str) -> str:
    refuse_control(key, f"fence parameter name {key[:40]!r}")
    if not key or "=" in key:
        raise ValueError(f"fence parameter name {key[:40]!r} must be non-empty and hold no '='")
    return key


def redact_config(data: dict[str, Any]) -> dict[str, Any]:
    """A dumped ClusterConfig with every plain secret-looking fence parameter replaced by
    REDACTED (credential references stay: they name a file, not its content)."""
    devices = data.get("fence_devices")
    if not isinstance(devices, dict):
        return data
    out = dict(data)
    out["fence_devices"] = {
        node: ({**dev, "params": {k: REDACTED if isinstance(v, str) and is_secret_key(k) else v
                                  for k, v in dev["params"].items()}}
               if isinstance(dev, dict) and isinstance(dev.get("params"), dict) else dev)
        for node, dev in devices.items()}
    return out


def plain_secrets(data: dict[str, Any]) -> list[str]:
    """Where a dumped ClusterConfig holds a secret-looking fence parameter in clear."""
    return [f"fence_devices.{node}.params.{k}"
            for node, dev in (data.get("fence_devices") or {}).items()
            for k, v in (dev.get("params") or {}).items()
            if isinstance(v, str) and is_secret_key(k) and not k.endswith(("_script", "_file"))]
