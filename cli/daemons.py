"""The daemons: `vmha agent` (one per node) and `vmha orchestrator` (leader election and
placement), with their options from the command line or a TOML file."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from cli.common import EXIT_INPUT, CliError, _first_error, _store, global_defaults
from schemas.keys import valid_name
from schemas.models import Capacity

if TYPE_CHECKING:
    from orchestrator.leader import Orchestrator

DEFAULT_GUARD_SOCKET = "/run/vmha/guard.sock"
DEFAULT_MIGRATION_ADDRESS = "127.0.0.1"


def load_daemon_config(args: argparse.Namespace, allowed: set[str]) -> None:
    """Fill options not given on the command line from a TOML file (/etc/vmha/*.toml).

    Command-line flags win; unknown keys are an error (a typo must not pass silently)."""
    if not args.config:
        return
    import tomllib

    try:
        with open(args.config, "rb") as f:
            data = tomllib.load(f)
    except (OSError, ValueError) as exc:  # ValueError: TOMLDecodeError, bytes not UTF-8
        raise CliError(f"{args.config}: {exc}", EXIT_INPUT) from None
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise CliError(f"{args.config}: unknown setting(s) {', '.join(unknown)}; known: "
                       f"{', '.join(sorted(allowed))}", EXIT_INPUT)
    defaults = global_defaults()
    for key, value in data.items():
        attr = key.replace("-", "_")
        if getattr(args, attr, None) in (None, False, "auto") or (
                attr in ("etcd", "prefix") and getattr(args, attr) == defaults.get(attr)):
            setattr(args, attr, value)


_COMMON_KEYS = {"etcd", "etcd_cacert", "etcd_cert", "etcd_key", "prefix", "name", "log_format",
                "metrics_listen"}
AGENT_KEYS = _COMMON_KEYS | {"libvirt_uri", "fake_root", "memory_mib", "vcpus",
                             "migration_address", "guard_socket", "drain_timeout_s",
                             "fenced_marker"}
GUARD_KEYS = {"socket", "socket_group", "libvirt_uri", "fake_root", "name", "watchdog",
              "watchdog_timeout", "log_format", "hold_lease", "restart_grace_s", "etcd",
              "prefix", "etcd_cacert", "etcd_cert", "etcd_key", "fenced_marker"}
# How long the guard service renews a lease for an agent that is restarting
# (fencing.lease_hold): systemd's RestartSec plus a slow start, several times over.
DEFAULT_RESTART_GRACE_S = 20.0
DEFAULT_DRAIN_TIMEOUT_S = 600.0  # the unit's TimeoutStopSec (15 min) leaves time to fence
ORCH_KEYS = _COMMON_KEYS
FENCED_MARKER_HELP = ("the file that says this host is fenced: written before the first "
                      "destroy, removed when the agent registers again; the libvirt qemu hook "
                      "refuses new domains while it exists (default /run/vmha/fenced; "
                      "<fake root>/<name>/fenced on the fake hypervisor)")


def agent_migration_address(args: argparse.Namespace) -> str:
    """The flag, else agent.toml's `migration_address`, else loopback.  The default is
    applied only here, after the TOML file: a parser default would look like a flag."""
    return str(args.migration_address or DEFAULT_MIGRATION_ADDRESS)


def _refuse_control(what: str, value: str | None) -> None:
    from schemas.secrets import control_char

    bad = control_char(value or "")
    if bad:
        raise CliError(f"{what} contains a control character ({bad})", EXIT_INPUT)


def cmd_agent(args: argparse.Namespace) -> int:
    from hypervisor.base import Hypervisor
    from nodeagent.agent import AgentOptions, NodeAgent
    from nodeagent.lifecycle import StopControl
    from telemetry import logs, metrics

    load_daemon_config(args, AGENT_KEYS)
    if not args.name or not (args.libvirt_uri or args.fake_root):
        raise CliError("agent needs --name and --libvirt-uri (or --fake-root), on the command "
                       "line or in --config", EXIT_INPUT)
    logs.setup(args.log_format)
    metrics.serve(args.metrics_listen)
    if not valid_name(args.name):
        raise CliError(f"invalid node name {args.name!r}", EXIT_INPUT)
    if args.memory_mib is not None or args.vcpus is not None:
        try:  # the bounds every reader applies (docs/keyspace.md): refused here, not in etcd
            Capacity(memory_mib=args.memory_mib or 1, vcpus=args.vcpus or 1)
        except ValueError as exc:
            raise CliError(f"agent capacity: {_first_error(exc)}", EXIT_INPUT) from None
    migration_address = agent_migration_address(args)
    # Both are registered for every node to read (and "{uri}" goes to fence agents).
    _refuse_control("--libvirt-uri", args.libvirt_uri)
    _refuse_control("--migration-address", migration_address)
    hv: Hypervisor
    if args.fake_root:
        from hypervisor.fake import FakeHypervisor

        hv = FakeHypervisor(Path(args.fake_root), args.name, args.memory_mib or 4096,
                            args.vcpus or 8, migrate_seconds=args.fake_migrate_seconds)
    else:
        from hypervisor.libvirt_adapter import LibvirtHypervisor

        hv = LibvirtHypervisor(args.libvirt_uri, args.memory_mib, args.vcpus)
    agent = NodeAgent(_store(args), hv, AgentOptions(name=args.name,
                                                     migration_address=migration_address,
                                                     guard_socket=args.guard_socket,
                                                     fenced_marker=args.fenced_marker))
    control = StopControl(agent, float(args.drain_timeout_s or DEFAULT_DRAIN_TIMEOUT_S),
                          unit=args.systemd_unit)
    # SIGTERM: a `systemctl restart` restarts in place, anything else drains (see
    # nodeagent.lifecycle); Ctrl-C drains; SIGUSR2 restarts in place.
    signal.signal(signal.SIGTERM, lambda *_: control.on_sigterm())
    signal.signal(signal.SIGINT, lambda *_: control.drain("SIGINT"))
    signal.signal(signal.SIGUSR2, lambda *_: control.on_sigusr2())
    if args.validate_config:
        agent.load_config()
        print("config ok")
        return 0
    return control.finish(agent.run())


def cmd_guard(args: argparse.Namespace) -> int:
    """The guard service (vmha-guard.service): fencing.guard_server."""
    from fencing.guard_server import serve

    load_daemon_config(args, GUARD_KEYS)
    if args.fake_root:
        if not args.name or not valid_name(args.name):
            raise CliError("guard --fake-root needs a valid --name", EXIT_INPUT)
        uri = f"fake://{Path(args.fake_root) / args.name}"
    elif args.libvirt_uri:
        uri = args.libvirt_uri
    else:
        raise CliError("guard needs --libvirt-uri (or --fake-root and --name)", EXIT_INPUT)
    if args.socket_group:
        import grp

        try:
            grp.getgrnam(args.socket_group)
        except KeyError:
            raise CliError(f"socket_group {args.socket_group!r}: no such group",
                           EXIT_INPUT) from None
    grace = DEFAULT_RESTART_GRACE_S if args.restart_grace_s is None else float(
        args.restart_grace_s)
    hold = _store(args) if args.hold_lease and grace > 0 else None
    return serve(args.socket or DEFAULT_GUARD_SOCKET, uri, args.watchdog,
                 int(args.watchdog_timeout or 10), args.fenced_marker, hold_store=hold,
                 restart_grace_s=grace, socket_group=args.socket_group)


def cmd_orchestrator(args: argparse.Namespace) -> int:
    from orchestrator.leader import EXIT_KEYSPACE_CHANGED
    from orchestrator.leader_v2 import orchestrator_for
    from telemetry import logs, metrics

    load_daemon_config(args, ORCH_KEYS)
    logs.setup(args.log_format)
    if not args.validate_config:
        metrics.serve(args.metrics_listen)
    shutdown = threading.Event()
    current = threading.Event()  # the stop event of the orchestrator choosing or running
    orch: Orchestrator | None = None
    prev: Orchestrator | None = None  # the loop that resigned at a keyspace change

    def stop(*_: object) -> None:
        shutdown.set()
        current.set()
        if orch is not None:
            orch.wake.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        # The keyspace /vmha/version names (absent: keyspace 1), asked until etcd answers
        # and waited for while a migration runs.
        orch = orchestrator_for(_store(args), args.name, current,
                                wait=not args.validate_config)
        if orch is None:
            return 0
        if prev is not None:
            orch.succeed(prev)
        if args.validate_config:
            orch.ensure_config()
            print("config ok")
            return 0
        code = orch.run()
        orch.store.close()
        if code != EXIT_KEYSPACE_CHANGED or shutdown.is_set():
            return code
        # The marker changed under the loop (a migration started or ended): this process
        # chooses again rather than exit, so no value in etcd stops the daemon; it has
        # resigned, and waits unelected until the keyspace it names is runnable.
        structlog.get_logger("vmha.orchestrator").info(
            "keyspace_reselect", reason="the keyspace marker changed: choosing the keyspace "
                                        "again in this process")
        current = threading.Event()
        prev = orch


def register(groups: dict[str, Any]) -> None:
    root = groups["root"]
    a = root.add_parser("agent", help="run the node agent daemon")
    a.add_argument("--config", help="TOML file with these options (e.g. /etc/vmha/agent.toml)")
    a.add_argument("--metrics-listen", help="serve Prometheus metrics on HOST:PORT")
    a.add_argument("--name")
    g = a.add_mutually_exclusive_group()
    g.add_argument("--libvirt-uri")
    g.add_argument("--fake-root", help="use the fake hypervisor with state in this directory")
    a.add_argument("--memory-mib", type=int)
    a.add_argument("--vcpus", type=int)
    a.add_argument("--migration-address", help="this node's address on the migration "
                                                f"network (default {DEFAULT_MIGRATION_ADDRESS})")
    a.add_argument("--fake-migrate-seconds", type=float, default=0.2)
    a.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    a.add_argument("--validate-config", action="store_true")
    a.add_argument("--guard-socket", help="attach to the guard service on this socket "
                                          f"(e.g. {DEFAULT_GUARD_SOCKET}); without it the "
                                          "agent starts a guard of its own")
    a.add_argument("--drain-timeout-s", type=float,
                   help="a drain on stop not finished after this many seconds destroys the "
                        f"node's VMs, revokes and exits (default {DEFAULT_DRAIN_TIMEOUT_S:g})")
    a.add_argument("--fenced-marker", help=FENCED_MARKER_HELP)
    a.add_argument("--systemd-unit", help="the unit whose restart job means 'restart in "
                                          "place' (default: this process's own unit)")
    a.set_defaults(fn=cmd_agent)

    gd = root.add_parser("guard", help="run the guard service (fences the host when no "
                                       "agent pets it in time)")
    gd.add_argument("--config", help="TOML file with these options (e.g. /etc/vmha/guard.toml)")
    gd.add_argument("--socket", help=f"unix socket agents attach to (default "
                                     f"{DEFAULT_GUARD_SOCKET})")
    gd.add_argument("--socket-group", help="the agent's group, also allowed to attach "
                                           "(socket mode 0660; default: 0600, this user only)")
    gg = gd.add_mutually_exclusive_group()
    gg.add_argument("--libvirt-uri")
    gg.add_argument("--fake-root", help="guard a fake hypervisor node (with --name)")
    gd.add_argument("--name", help="the node, with --fake-root")
    gd.add_argument("--watchdog", help="e.g. /dev/watchdog (modprobe softdog where there is "
                                       "no hardware one): held and fed until the guard fires")
    gd.add_argument("--watchdog-timeout", type=int, help="seconds (default 10)")
    gd.add_argument("--hold-lease", action="store_true",
                    help="while no agent is attached, renew the agent's lease in etcd (the "
                         "global --etcd options) for up to --restart-grace-s, so a slow "
                         "agent restart keeps the VMs")
    gd.add_argument("--restart-grace-s", type=float,
                    help=f"seconds a lease is held for a restarting agent (default "
                         f"{DEFAULT_RESTART_GRACE_S:g}; 0: never)")
    gd.add_argument("--fenced-marker", help=FENCED_MARKER_HELP)
    gd.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    gd.set_defaults(fn=cmd_guard)

    o = root.add_parser("orchestrator", help="run the orchestrator daemon")
    o.add_argument("--name")
    o.add_argument("--config", help="TOML file with these options "
                                    "(e.g. /etc/vmha/orchestrator.toml)")
    o.add_argument("--metrics-listen", help="serve Prometheus metrics on HOST:PORT")
    o.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    o.add_argument("--validate-config", action="store_true")
    o.set_defaults(fn=cmd_orchestrator)
