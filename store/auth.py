"""etcd's authentication API (users, roles, permissions, enabling auth) through the
client's gRPC Auth stub, with the store's retries and error mapping.

The client library has no calls for these, so they are sent on its `authstub` with its
per-call credentials, as `EtcdStore.txn` sends Txn.  Every call that changes etcd's auth
state is recorded in `EtcdAuth.writes`, in order, so a caller (and a test) can tell a run
that changed nothing from one that did: auth changes do not move the key-value revision.

Retried writes are made idempotent: a role or user add whose first attempt was applied
before its answer was lost gets "already exists" on the retry, which is the outcome
wanted; likewise "not found" for a delete and "not granted" for a revoke.  Grants and
auth enable are idempotent in etcd itself.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
import structlog
from pyetcd import etcdrpc
from pyetcd.etcdrpc import auth_pb2

from schemas.acl import KeyRange
from store.etcd import EtcdStore

__all__ = ["AuthState", "EtcdAuth", "Grant", "PermKind"]

log = structlog.get_logger("vmha.store.auth")

PermKind = Literal["read", "write", "readwrite"]
_PERM_TYPE: dict[PermKind, int] = {"read": auth_pb2.Permission.READ,
                                   "write": auth_pb2.Permission.WRITE,
                                   "readwrite": auth_pb2.Permission.READWRITE}
_PERM_KIND: dict[int, PermKind] = {v: k for k, v in _PERM_TYPE.items()}

# etcd's answer to Authenticate while auth is off (`auth.ErrAuthNotEnabled`).
_NOT_ENABLED = "authentication is not enabled"


@dataclass(frozen=True)
class Grant:
    """One permission of a role: its kind and its keys."""

    kind: PermKind
    keys: KeyRange

    def __str__(self) -> str:
        return f"{self.kind} {self.keys}"


@dataclass(frozen=True)
class AuthState:
    """What etcd holds for the roles and users asked about: role -> grants, user ->
    roles (absent: no such role or user), and whether auth is enabled."""

    enabled: bool
    roles: dict[str, frozenset[Grant]] = field(default_factory=dict)
    users: dict[str, frozenset[str]] = field(default_factory=dict)


class EtcdAuth:
    """etcd's Auth service for one store (its endpoints, TLS and retry budget).  Once
    auth is enabled every call but `enabled()` needs the root role: a client certificate
    with CN `root`."""

    def __init__(self, store: EtcdStore) -> None:
        self._store = store
        self.writes: list[str] = []

    def _rpc(self, what: str, method: str, request: Any, *, write: bool = False,
             already: str = "") -> Any:
        """One call; `already`: etcd's answer (FAILED_PRECONDITION) when the outcome the
        write asks for already holds, taken as success.  Any other refusal, such as a
        grant to a role that does not exist, raises."""
        client = self._store.client

        def run() -> Any:
            try:
                return getattr(client.authstub, method)(
                    request, self._store.timeout, credentials=client.call_credentials,
                    metadata=client.metadata)
            except grpc.RpcError as exc:
                if (already and exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                        and already in str(exc.details())):
                    log.info("auth_write_already_applied", what=what, answer=exc.details())
                    return None
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    client._manage_grpc_errors(exc)  # fails over, or re-raises
                raise  # etcd's refusal with its reason (the client's error drops it)

        if write:
            self.writes.append(what)
            log.info("auth_write", what=what)
        return self._store.call(what, run)

    # ---- reads -------------------------------------------------------------------------

    def enabled(self) -> bool:
        """Whether etcd enforces auth.  etcd 3.4 has no call that says so (3.5's
        AuthStatus): an Authenticate with a user that does not exist answers "not
        enabled" while auth is off and "authentication failed" once on.  A failed
        Authenticate is refused before it reaches raft, so the probe writes nothing."""
        client = self._store.client
        request = etcdrpc.AuthenticateRequest(name="vmha-auth-probe." + secrets.token_hex(8),
                                              password=secrets.token_hex(16))

        def run() -> bool:
            try:
                client.authstub.Authenticate(request, self._store.timeout)
            except grpc.RpcError as exc:
                details = str(exc.details())
                if _NOT_ENABLED in details:
                    return False
                if "authentication failed" in details:
                    return True
                client._manage_grpc_errors(exc)
                raise
            return True  # a user of that name and password: impossible, but auth is on

        return self._store.call("auth probe", run)

    def role_names(self) -> list[str]:
        return list(self._rpc("role list", "RoleList", etcdrpc.AuthRoleListRequest()).roles)

    def user_names(self) -> list[str]:
        return list(self._rpc("user list", "UserList", etcdrpc.AuthUserListRequest()).users)

    def role_grants(self, role: str) -> frozenset[Grant]:
        resp = self._rpc(f"role get {role}", "RoleGet", etcdrpc.AuthRoleGetRequest(role=role))
        return frozenset(Grant(_PERM_KIND[p.permType], KeyRange(p.key, p.range_end))
                         for p in resp.perm)

    def user_roles(self, user: str) -> frozenset[str]:
        resp = self._rpc(f"user get {user}", "UserGet", etcdrpc.AuthUserGetRequest(name=user))
        return frozenset(resp.roles)

    def state(self, wanted: Callable[[str], bool]) -> AuthState:
        """Auth on or off, and the roles and users whose names `wanted` accepts (one get
        each: etcd lists names only)."""
        enabled = self.enabled()
        roles = {r: self.role_grants(r) for r in self.role_names() if wanted(r)}
        users = {u: self.user_roles(u) for u in self.user_names() if wanted(u)}
        return AuthState(enabled, roles, users)

    # ---- writes ------------------------------------------------------------------------

    def role_add(self, role: str) -> None:
        self._rpc(f"role add {role}", "RoleAdd", etcdrpc.AuthRoleAddRequest(name=role),
                  write=True, already="role name already exists")

    def role_delete(self, role: str) -> None:
        self._rpc(f"role delete {role}", "RoleDelete",
                  etcdrpc.AuthRoleDeleteRequest(role=role), write=True,
                  already="role name not found")

    def grant(self, role: str, grant: Grant) -> None:
        perm = auth_pb2.Permission(permType=_PERM_TYPE[grant.kind], key=grant.keys.start,
                                   range_end=grant.keys.end)
        self._rpc(f"grant {role} {grant}", "RoleGrantPermission",
                  etcdrpc.AuthRoleGrantPermissionRequest(name=role, perm=perm), write=True)

    def revoke(self, role: str, keys: KeyRange) -> None:
        # The request's key fields are proto `string`s: etcd's keys are UTF-8 here.
        self._rpc(f"revoke {role} {keys}", "RoleRevokePermission",
                  etcdrpc.AuthRoleRevokePermissionRequest(
                      role=role, key=keys.start.decode(), range_end=keys.end.decode()),
                  write=True, already="permission is not granted")

    def user_add(self, user: str) -> None:
        """A user that logs in by client certificate only.  etcd 3.4's API (the one the
        client ships) has no password-less user: the password is 32 random bytes, never
        printed or stored, so the only way in is a certificate whose CN is `user`."""
        self._rpc(f"user add {user}", "UserAdd",
                  etcdrpc.AuthUserAddRequest(name=user, password=secrets.token_urlsafe(32)),
                  write=True, already="user name already exists")

    def user_add_with_password(self, user: str, password: str) -> None:
        self._rpc(f"user add {user} (password)", "UserAdd",
                  etcdrpc.AuthUserAddRequest(name=user, password=password), write=True,
                  already="user name already exists")

    def user_delete(self, user: str) -> None:
        self._rpc(f"user delete {user}", "UserDelete", etcdrpc.AuthUserDeleteRequest(name=user),
                  write=True, already="user name not found")

    def user_grant_role(self, user: str, role: str) -> None:
        self._rpc(f"user {user} grant role {role}", "UserGrantRole",
                  etcdrpc.AuthUserGrantRoleRequest(user=user, role=role), write=True)

    def auth_enable(self) -> None:
        self._rpc("auth enable", "AuthEnable", etcdrpc.AuthEnableRequest(), write=True)
