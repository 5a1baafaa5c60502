"""External fence agents, run the ClusterLabs way.

A fence agent (fence_ipmilan, fence_redfish, fence_virsh, ... or vmha's built-in
`python -m fencing.fence_vmha`) is an executable that reads `key=value` lines on
stdin, one of them `action=off|on|reboot|status|monitor`, and exits 0 on success.
For `status`, exit 0 means the target is ON and exit 2 that it is OFF.

Parameter values come from the operator's config; a `{"credential": NAME}` value is read
from the file NAME in `$CREDENTIALS_DIRECTORY` (systemd's `LoadCredential=`) at each run
and scrubbed from what the agent prints.  "{node}" and "{uri}" with a control character
are refused: the agent is not run.

`fence_off()` runs `action=off` and, if the device says so (`verify`, the default),
confirms with `action=status` that the target is now off.  Every call has the
device's timeout; a timeout, a non-zero exit or a status other than "off" is a
failure.  The whole process group of a timed-out agent is killed.

`ExternalFencer` runs those calls on a small thread pool for the leader, so a hung
fence device never blocks its cycle; the leader records each outcome in etcd.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from schemas.models import ClusterConfig, FenceDevice
from schemas.secrets import REDACTED, CredentialRef, control_char, is_secret_key

STATUS_ON, STATUS_OFF = 0, 2


@dataclass(frozen=True)
class FenceResult:
    ok: bool
    detail: str
    duration_s: float


class FenceParamError(ValueError):
    """The parameters cannot be given to the agent (a missing credential, a control
    character): the agent is not run.  The message never holds a secret."""


MAX_CREDENTIAL_BYTES = 4096


def credentials_dir() -> Path | None:
    """Where secrets are read: systemd's `LoadCredential=` directory for this service."""
    d = os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(d) if d else None


def _read_credential(name: str) -> str:
    base = credentials_dir()
    if base is None:
        raise FenceParamError(f"credential {name!r}: $CREDENTIALS_DIRECTORY is not set "
                              "(give it with LoadCredential= in the orchestrator's unit)")
    try:
        with open(base / name, "rb") as f:
            raw = f.read(MAX_CREDENTIAL_BYTES + 1)
    except OSError as exc:
        raise FenceParamError(f"credential {name!r}: cannot read it from {base}: "
                              f"{exc.strerror or type(exc).__name__}") from None
    if len(raw) > MAX_CREDENTIAL_BYTES:
        raise FenceParamError(f"credential {name!r}: longer than {MAX_CREDENTIAL_BYTES} bytes")
    try:
        # A file written with `echo` ends with one line break: not part of the secret.
        value = raw.decode().removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError:
        raise FenceParamError(f"credential {name!r}: not UTF-8") from None
    bad = control_char(value)
    if bad or not value:
        raise FenceParamError(f"credential {name!r}: " + (
            f"contains a control character ({bad})" if bad else "empty"))
    return value


def missing_credentials(cfg: ClusterConfig) -> list[str]:
    """The credentials `cfg`'s fence devices name that cannot be read here now."""
    names = sorted({v.credential for dev in cfg.fence_devices.values()
                    for v in dev.params.values() if isinstance(v, CredentialRef)})
    missing = []
    for name in names:
        try:
            _read_credential(name)
        except FenceParamError:
            missing.append(name)
    return missing


def resolve_params(device: FenceDevice, node: str, uri: str) -> tuple[dict[str, str], list[str]]:
    """The parameters as the agent gets them, and the secret values among them (to scrub
    from its output).  "{node}" and "{uri}" are the only values not from the operator's
    config: one with a control character is refused, never substituted."""
    for what, given in (("node name", node), (f"registered URI of {node}", uri)):
        bad = control_char(given)
        if bad:
            raise FenceParamError(f"refused: the {what} contains a control character "
                                  f"({bad}); it is not given to the fence agent")
    params: dict[str, str] = {}
    secrets: list[str] = []
    for key, value in sorted(device.params.items()):
        if isinstance(value, CredentialRef):
            params[key] = _read_credential(value.credential)
            secrets.append(params[key])
        else:
            params[key] = value.replace("{node}", node).replace("{uri}", uri)
            if is_secret_key(key) and params[key]:
                secrets.append(params[key])
    return params, secrets


def scrub(text: str, secrets: list[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def _params(device: FenceDevice, node: str, uri: str, action: str) -> tuple[str, list[str]]:
    params, secrets = resolve_params(device, node, uri)
    lines = [f"{k}={v}" for k, v in params.items()]
    lines.append(f"action={action}")
    return "\n".join(lines) + "\n", secrets


def run_action(device: FenceDevice, node: str, uri: str, action: str) -> tuple[int | None, str]:
    """Run one action; (exit code or None on timeout, last output line, secrets scrubbed).
    FenceParamError: the parameters were refused and nothing was run."""
    stdin, secrets = _params(device, node, uri, action)
    proc = subprocess.Popen(device.agent, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(stdin.encode(), timeout=device.timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None, f"timed out after {device.timeout_s} s"
    text = scrub(out.decode(errors="replace"), secrets).strip().splitlines()
    return proc.returncode, (text[-1] if text else "")[:200]


def fence_off(device: FenceDevice, node: str, uri: str) -> FenceResult:
    started = time.monotonic()
    name = os.path.basename(device.agent[0]) if len(device.agent) == 1 else " ".join(device.agent)

    def took() -> float:
        return round(time.monotonic() - started, 3)

    try:
        rc, out = run_action(device, node, uri, "off")
    except FenceParamError as exc:
        return FenceResult(False, f"{name}: {exc}", took())
    except OSError as exc:
        return FenceResult(False, f"{name}: cannot run: {exc}", took())
    if rc != 0:
        return FenceResult(False, f"{name} action=off " + (out if rc is None else
                                                            f"exited {rc}: {out}"), took())
    if device.verify:
        try:
            rc, out = run_action(device, node, uri, "status")
        except FenceParamError as exc:
            return FenceResult(False, f"{name}: status: {exc}", took())
        except OSError as exc:
            return FenceResult(False, f"{name}: cannot run status: {exc}", took())
        if rc != STATUS_OFF:
            return FenceResult(False, f"{name} action=status after off: " + (
                out if rc is None else f"exit {rc} (need {STATUS_OFF} = off): {out}"), took())
    return FenceResult(True, f"{name}: off" + (" (verified by status)" if device.verify else ""),
                       took())


class ExternalFencer:
    """At most one fence run per node at a time, off the leader's cycle."""

    def __init__(self, workers: int = 4, wake: threading.Event | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fence")
        self._jobs: dict[str, Future[FenceResult]] = {}
        self._tags: dict[str, object] = {}
        self._wake = wake

    def running(self, node: str) -> bool:
        f = self._jobs.get(node)
        return f is not None and not f.done()

    def start(self, node: str, device: FenceDevice, uri: str, tag: object = None) -> bool:
        """Start fencing `node` unless a run is pending.  `tag` comes back with the
        result, so the caller can drop a result that belongs to an older episode."""
        if node in self._jobs:
            return False  # running, or finished and not yet collected
        self._tags[node] = tag
        fut = self._pool.submit(fence_off, device, node, uri)
        if self._wake is not None:
            wake = self._wake
            fut.add_done_callback(lambda _f: wake.set())
        self._jobs[node] = fut
        return True

    def collect(self) -> list[tuple[str, FenceResult, object]]:
        """Finished runs: (node, result, the tag given to start())."""
        out: list[tuple[str, FenceResult, object]] = []
        for node, fut in list(self._jobs.items()):
            if fut.done():
                del self._jobs[node]
                tag = self._tags.pop(node, None)
                try:
                    out.append((node, fut.result(), tag))
                except Exception as exc:  # noqa: BLE001 - a bug in a fencer is a failed fence
                    out.append((node, FenceResult(False, f"fencer error: {exc!r}", 0.0), tag))
        return out

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
