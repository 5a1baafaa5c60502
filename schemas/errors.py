"""vmha's error taxonomy: every error says whether trying again can help.

Daemons branch on the kind, never on the concrete class:

* `TemporaryError`: a dependency (etcd, the hypervisor connection) did not answer or
  lost a race; the daemon logs it and tries again on its next cycle, and acts on
  nothing it could not read.
* `PermanentError`: the input or the request is wrong (a malformed value, an unsafe
  config, an operation the hypervisor refuses); retrying the same thing gives the same
  answer, so it is reported, not retried.

A programming error (a `TypeError`, a `ValueError` from a bug) is neither: it
propagates, so it is never mistaken for an outage.
"""

from __future__ import annotations


class VmhaError(Exception):
    """Base of every error vmha raises on purpose."""


class TemporaryError(VmhaError):
    """Trying again later may succeed (outage, timeout, lost race)."""


class PermanentError(VmhaError):
    """Trying again will not help until the input or the state is changed."""


class InvariantError(PermanentError):
    """Code reached a state its own logic rules out (replaces a runtime `assert`,
    which `python -O` would remove)."""


class ConfigError(PermanentError, ValueError):
    """The cluster config is invalid or unsafe: a daemon refuses to start on it, and a
    running leader keeps deciding with the last config that validated."""


class SchemaError(PermanentError, ValueError):
    """A value in etcd (or given on the command line) does not match its schema.

    Permanent: retrying will not help; the value must be fixed.  Still a `ValueError`
    for callers that validate input generically.
    """

    def __init__(self, key: str, field: str, message: str) -> None:
        self.key = key
        self.field = field
        self.message = message
        where = f"{key}: field '{field}'" if field else key
        super().__init__(f"{where}: {message}")
