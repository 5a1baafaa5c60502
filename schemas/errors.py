"""Validation errors that name the key and the field at fault."""

from __future__ import annotations


class SchemaError(ValueError):
    """A value in etcd (or given on the command line) does not match its schema.

    This is a *permanent* error: retrying will not help; the value must be fixed.
    """

    def __init__(self, key: str, field: str, message: str) -> None:
        self.key = key
        self.field = field
        self.message = message
        where = f"{key}: field '{field}'" if field else key
        super().__init__(f"{where}: {message}")
