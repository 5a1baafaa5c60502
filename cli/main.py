"""`vmha`: the daemons (`agent`, `orchestrator`) and the operator commands.

Exit codes: 0 success, 1 operation failed, 2 bad input (usage or validation),
3 etcd unreachable.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cli import fence, ops, sim, web
from cli.common import (
    EXIT_ETCD,
    EXIT_FAIL,
    EXIT_INPUT,
    CliError,
    _ago,
    _first_error,
    _node_rows,
    _out,
    _store,
    default_domain_xml,
)
from schemas import ClusterConfig, Keyspace, SchemaError, VmSpec
from schemas.keys import valid_name

#: Adds commands to the parser: gets the groups "root", "vm", "node" and "config" (argparse
#: sub-parser collections).  Layers above the CLI (the lab, the benchmarks) pass theirs in.
Registrar = Callable[[dict[str, Any]], None]

#: The CLI's own command groups beyond this module.
BUILTIN: tuple[Registrar, ...] = (ops.register, web.register, fence.register, sim.register)

__all__ = ["EXIT_ETCD", "EXIT_FAIL", "EXIT_INPUT", "CliError", "Registrar", "build_parser",
           "default_domain_xml", "main"]


# ---- daemons -----------------------------------------------------------------------------

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
    for key, value in data.items():
        attr = key.replace("-", "_")
        if getattr(args, attr, None) in (None, False, "auto") or (
                attr in ("etcd", "prefix") and getattr(args, attr) == _DEFAULTS.get(attr)):
            setattr(args, attr, value)


_DEFAULTS = {"etcd": os.environ.get("VMHA_ETCD", "127.0.0.1:2379"),
             "prefix": os.environ.get("VMHA_PREFIX", "/vmha")}
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


# ---- operator commands -------------------------------------------------------------------

def cmd_vm_add(args: argparse.Namespace) -> int:
    xml = Path(args.xml).read_text() if args.xml else default_domain_xml(
        args.name, args.memory_mib, args.vcpus)
    try:
        spec = VmSpec(name=args.name, domain_xml=xml, memory_mib=args.memory_mib,
                      vcpus=args.vcpus, state="stopped" if args.stopped else "running")
    except ValueError as exc:
        raise CliError(str(SchemaError(f"vm {args.name}", "", _first_error(exc))),
                       EXIT_INPUT) from None
    store = _store(args)
    from store.etcd import Cmp, Put

    key = store.keyspace.vm_spec(args.name)
    res = store.txn([Cmp(key, "create", "==", 0)], [Put(key, spec.to_json())])
    if not res.succeeded:
        raise CliError(f"VM {args.name!r} already exists ({key})", EXIT_INPUT)
    print(f"vm/{args.name} added ({key}, revision {res.revision})")
    return 0


def cmd_vm_remove(args: argparse.Namespace) -> int:
    store = _store(args)
    ks = store.keyspace
    if store.get(ks.vm_spec(args.name)) is None:
        raise CliError(f"no VM named {args.name!r}", EXIT_INPUT)
    store.delete(ks.vm_spec(args.name))
    print(f"vm/{args.name} removed (its node destroys and undefines it)")
    return 0


def cmd_vm_list(args: argparse.Namespace) -> int:
    snap = _store(args).snapshot()
    rows = []
    for name in sorted(snap.specs):
        spec = snap.specs[name].value
        p = snap.placements[name].value if name in snap.placements else None
        s = snap.statuses[name].value if name in snap.statuses else None
        rows.append({"name": name, "desired": spec.state, "memory_mib": spec.memory_mib,
                     "vcpus": spec.vcpus, "placed_on": p.node if p else None,
                     "placement": p.kind if p else None, "node": s.node if s else None,
                     "state": s.state if s else None, "since": s.since if s else None,
                     "reason": p.reason if p else None})
    table = [["NAME", "DESIRED", "MEM", "VCPU", "PLACED", "NODE", "STATE", "SINCE"]] + [
        [r["name"], r["desired"], r["memory_mib"], r["vcpus"],
         f"{r['placed_on'] or '-'}({r['placement'] or '-'})", r["node"] or "-",
         r["state"] or "-", _ago(r["since"])] for r in rows]
    _out(args, rows, table)
    return 0


def cmd_node_list(args: argparse.Namespace) -> int:
    store = _store(args)
    rows = _node_rows(store.snapshot(), store)
    table = [["NAME", "STATE", "LEASE", "TTL", "FREE MEM", "VCPU"]] + [
        [r["name"], ("fenced" if r["fenced"] else "lost" if not r["registered"]
                     else "cordoned" if r["cordoned"] else "ready"),
         r["lease_id"] or "-", r["lease_ttl_s"] if r["lease_ttl_s"] is not None else "-",
         f"{r['free_memory_mib']}/{r['memory_mib']}" if r["registered"] else "-",
         r["vcpus"] or "-"] for r in rows]
    _out(args, rows, table)
    return 0


def cmd_node_uncordon(args: argparse.Namespace) -> int:
    store = _store(args)
    key = store.keyspace.cordon(args.name)
    if store.get(key) is None:
        if store.get(store.keyspace.node(args.name)) is None:
            raise CliError(f"unknown node {args.name!r}", EXIT_INPUT)
        print(f"node/{args.name} is not cordoned")
        return 0
    store.delete(key)
    print(f"node/{args.name} uncordoned")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    store = _store(args)
    snap = store.snapshot()
    leader = snap.leader
    data = {
        "revision": snap.revision,
        "leader": ({"id": leader.value.id, "epoch": leader.create_revision,
                    "since": leader.value.elected_at} if leader else None),
        "nodes": _node_rows(snap, store),
        "invalid_keys": [str(e) for e in snap.errors],
    }
    vms = []
    for name in sorted(snap.specs):
        p = snap.placements[name].value if name in snap.placements else None
        s = snap.statuses[name].value if name in snap.statuses else None
        vms.append({"name": name, "desired": snap.specs[name].value.state,
                    "node": s.node if s else None, "state": s.state if s else None,
                    "since": s.since if s else None, "placed_on": p.node if p else None,
                    "reason": p.reason if p else None})
    data["vms"] = vms
    if args.output == "json":
        _out(args, data, None)
        return 0
    print(f"leader: {leader.value.id} (epoch {leader.create_revision})" if leader
          else "leader: none")
    args_copy = argparse.Namespace(**vars(args))
    cmd_node_list(args_copy)
    print()
    cmd_vm_list(args_copy)
    for e in data["invalid_keys"]:
        print(f"invalid: {e}")
    return 0


def cmd_config_validate(args: argparse.Namespace) -> int:
    from fencing.policy import validate_timing

    if args.file:
        cfg = read_cluster_config(args.file)
    else:
        snap = _store(args).snapshot()
        bad = [e for e in snap.errors if e.key == snap_config_key(args)]
        if bad:
            raise CliError(str(bad[0]), EXIT_INPUT)
        cfg = snap.config
    problems = validate_timing(cfg)
    for p in problems:
        print(f"unsafe: {p}", file=sys.stderr)
    if problems:
        return EXIT_INPUT
    print("config ok")
    return 0


def read_cluster_config(path: str) -> ClusterConfig:
    """Cluster config from a TOML (/etc/vmha/cluster.toml) or JSON file."""
    try:
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as f:
                return ClusterConfig.parse_dict(tomllib.load(f), key=path)
        return ClusterConfig.from_json(Path(path).read_text(), key=path)
    except SchemaError as exc:
        raise CliError(str(exc), EXIT_INPUT) from None
    except (OSError, ValueError) as exc:
        raise CliError(f"{path}: {exc}", EXIT_INPUT) from None


def cmd_config_apply(args: argparse.Namespace) -> int:
    from fencing.policy import validate_timing

    cfg = read_cluster_config(args.file)
    problems = validate_timing(cfg)
    for p in problems:
        print(f"unsafe: {p}", file=sys.stderr)
    if problems:
        print("refused: nothing written", file=sys.stderr)
        return EXIT_INPUT
    store = _store(args)
    rev = store.put(store.keyspace.config, cfg.to_json())
    print(f"config written to {store.keyspace.config} (revision {rev}); agents read it when "
          "they (re)register, the leader at its next cycle")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    snap = _store(args).snapshot()
    _out(args, snap.config.model_dump(by_alias=True, mode="json"), None)
    return 0


def cmd_completion(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`source <(vmha completion bash)`, or save it under /etc/bash_completion.d/vmha."""
    import shtab

    print(shtab.complete(parser, shell=args.shell))
    return 0


def snap_config_key(args: argparse.Namespace) -> str:
    return Keyspace(args.prefix).config


# ---- parser ------------------------------------------------------------------------------

def build_parser(extra: Sequence[Registrar] = ()) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vmha", description="High availability for libvirt VMs.")
    ap.add_argument("--etcd", default=os.environ.get("VMHA_ETCD", "127.0.0.1:2379"),
                    help="etcd endpoints, comma separated (env VMHA_ETCD)")
    ap.add_argument("--prefix", default=os.environ.get("VMHA_PREFIX", "/vmha"),
                    help="key prefix (env VMHA_PREFIX)")
    for flag, env, what in (("cacert", "VMHA_ETCD_CACERT", "CA bundle of the etcd servers"),
                            ("cert", "VMHA_ETCD_CERT", "client certificate"),
                            ("key", "VMHA_ETCD_KEY", "client key")):
        ap.add_argument(f"--etcd-{flag}", default=os.environ.get(env),
                        help=f"TLS to etcd: {what} (env {env})")
    ap.add_argument("-o", "--output", choices=["table", "json"], default="table")
    sub = ap.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("agent", help="run the node agent daemon")
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

    o = sub.add_parser("orchestrator", help="run the orchestrator daemon")
    o.add_argument("--name")
    o.add_argument("--config", help="TOML file with these options "
                                    "(e.g. /etc/vmha/orchestrator.toml)")
    o.add_argument("--metrics-listen", help="serve Prometheus metrics on HOST:PORT")
    o.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    o.add_argument("--validate-config", action="store_true")
    o.set_defaults(fn=cmd_orchestrator)

    vm = sub.add_parser("vm", help="declare and inspect VMs").add_subparsers(dest="vmcmd",
                                                                           required=True)
    add = vm.add_parser("add")
    add.add_argument("name")
    add.add_argument("--memory-mib", type=int, required=True)
    add.add_argument("--vcpus", type=int, default=1)
    add.add_argument("--xml", help="libvirt domain XML file (default: a disk-less guest)")
    add.add_argument("--stopped", action="store_true", help="declare it powered off")
    add.set_defaults(fn=cmd_vm_add)
    rm = vm.add_parser("remove")
    rm.add_argument("name")
    rm.set_defaults(fn=cmd_vm_remove)
    vm.add_parser("list").set_defaults(fn=cmd_vm_list)

    node = sub.add_parser("node", help="inspect and cordon nodes").add_subparsers(
        dest="nodecmd", required=True)
    node.add_parser("list").set_defaults(fn=cmd_node_list)
    unc = node.add_parser("uncordon")
    unc.add_argument("name")
    unc.set_defaults(fn=cmd_node_uncordon)

    sub.add_parser("status", help="one screen: leader, nodes, VMs").set_defaults(fn=cmd_status)

    cfg = sub.add_parser("config", help="cluster config").add_subparsers(dest="cfgcmd",
                                                                         required=True)
    val = cfg.add_parser("validate", help="check timing rules (file or the one in etcd)")
    val.add_argument("--file")
    val.set_defaults(fn=cmd_config_validate)
    app = cfg.add_parser("apply", help="validate a cluster config file and write it to etcd")
    app.add_argument("--file", required=True)
    app.set_defaults(fn=cmd_config_apply)
    cfg.add_parser("show", help="the cluster config in etcd").set_defaults(fn=cmd_config_show)

    comp = sub.add_parser("completion", help="print a shell completion script")
    comp.add_argument("shell", choices=["bash", "zsh", "tcsh"])
    comp.set_defaults(fn=lambda a: cmd_completion(a, ap))

    groups = {"root": sub, "vm": vm, "node": node, "config": cfg}
    for register in (*BUILTIN, *extra):
        register(groups)
    return ap


def main(argv: Sequence[str] | None = None, extra: Sequence[Registrar] = ()) -> int:
    from store.etcd import StoreUnavailable

    args = build_parser(extra).parse_args(argv)
    try:
        return int(args.fn(args))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except StoreUnavailable as exc:
        print(f"error: etcd unreachable at {args.etcd}: {exc}", file=sys.stderr)
        return EXIT_ETCD
    except ValueError as exc:  # e.g. a malformed --etcd value
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT

