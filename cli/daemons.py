"""The daemons: `vmha agent` (one per node) and `vmha orchestrator` (leader election and
placement), with their options from the command line or a TOML file."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any

from cli.common import EXIT_INPUT, CliError, _store, global_defaults
from schemas.keys import valid_name


def load_daemon_config(args: argparse.Namespace, allowed: set[str]) -> None:
    """Fill options not given on the command line from a TOML file (/etc/vmha/*.toml).

    Command-line flags win; unknown keys are an error (a typo must not pass silently)."""
    if not args.config:
        return
    import tomllib

    try:
        with open(args.config, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
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
                             "migration_address"}
ORCH_KEYS = _COMMON_KEYS


def cmd_agent(args: argparse.Namespace) -> int:
    from hypervisor.base import Hypervisor
    from nodeagent.agent import AgentOptions, NodeAgent
    from telemetry import logs, metrics

    load_daemon_config(args, AGENT_KEYS)
    if not args.name or not (args.libvirt_uri or args.fake_root):
        raise CliError("agent needs --name and --libvirt-uri (or --fake-root), on the command "
                       "line or in --config", EXIT_INPUT)
    logs.setup(args.log_format)
    metrics.serve(args.metrics_listen)
    if not valid_name(args.name):
        raise CliError(f"invalid node name {args.name!r}", EXIT_INPUT)
    hv: Hypervisor
    if args.fake_root:
        from hypervisor.fake import FakeHypervisor

        hv = FakeHypervisor(Path(args.fake_root), args.name, args.memory_mib or 4096,
                            args.vcpus or 8, migrate_seconds=args.fake_migrate_seconds)
    else:
        from hypervisor.libvirt_adapter import LibvirtHypervisor

        hv = LibvirtHypervisor(args.libvirt_uri, args.memory_mib, args.vcpus)
    agent = NodeAgent(_store(args), hv, AgentOptions(name=args.name,
                                                     migration_address=args.migration_address))
    signal.signal(signal.SIGTERM, lambda *_: agent.request_exit())
    signal.signal(signal.SIGINT, lambda *_: agent.request_exit())
    if args.validate_config:
        agent.load_config()
        print("config ok")
        return 0
    return agent.run()


def cmd_orchestrator(args: argparse.Namespace) -> int:
    from orchestrator.leader import Orchestrator
    from telemetry import logs, metrics

    load_daemon_config(args, ORCH_KEYS)
    logs.setup(args.log_format)
    if not args.validate_config:
        metrics.serve(args.metrics_listen)
    orch = Orchestrator(_store(args), ident=args.name)
    if args.validate_config:
        orch.ensure_config()
        print("config ok")
        return 0

    def stop(*_: object) -> None:
        orch.stopped.set()
        orch.wake.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return orch.run()


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
    a.add_argument("--migration-address", default="127.0.0.1")
    a.add_argument("--fake-migrate-seconds", type=float, default=0.2)
    a.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    a.add_argument("--validate-config", action="store_true")
    a.set_defaults(fn=cmd_agent)

    o = root.add_parser("orchestrator", help="run the orchestrator daemon")
    o.add_argument("--name")
    o.add_argument("--config", help="TOML file with these options "
                                    "(e.g. /etc/vmha/orchestrator.toml)")
    o.add_argument("--metrics-listen", help="serve Prometheus metrics on HOST:PORT")
    o.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    o.add_argument("--validate-config", action="store_true")
    o.set_defaults(fn=cmd_orchestrator)
