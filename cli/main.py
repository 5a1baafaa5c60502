"""`vmha`: the parser (global options, then each noun module's commands) and dispatch.

Exit codes: 0 success, 1 operation failed, 2 bad input (usage or validation),
3 etcd unreachable.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from cli import (
    auth,
    completion,
    config,
    daemons,
    fence,
    history,
    keyspace,
    node,
    sim,
    status,
    vm,
    web,
)
from cli.common import (
    EXIT_ETCD,
    EXIT_FAIL,
    EXIT_INPUT,
    CliError,
    Registrar,
    default_domain_xml,
    global_defaults,
)
from cli.status import cmd_status

#: The CLI's command groups, in the order `vmha --help` lists them.
BUILTIN: tuple[Registrar, ...] = (daemons.register, vm.register, node.register,
                                  status.register, config.register, completion.register,
                                  history.register, web.register, fence.register, sim.register,
                                  auth.register, keyspace.register)

__all__ = ["EXIT_ETCD", "EXIT_FAIL", "EXIT_INPUT", "CliError", "Registrar", "build_parser",
           "cmd_status", "default_domain_xml", "main"]


def build_parser(extra: Sequence[Registrar] = ()) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vmha", description="High availability for libvirt VMs.")
    defaults = global_defaults()
    ap.add_argument("--etcd", default=defaults["etcd"],
                    help="etcd endpoints, comma separated (env VMHA_ETCD)")
    ap.add_argument("--prefix", default=defaults["prefix"], help="key prefix (env VMHA_PREFIX)")
    for flag, env, what in (("cacert", "VMHA_ETCD_CACERT", "CA bundle of the etcd servers"),
                            ("cert", "VMHA_ETCD_CERT", "client certificate"),
                            ("key", "VMHA_ETCD_KEY", "client key")):
        ap.add_argument(f"--etcd-{flag}", default=os.environ.get(env),
                        help=f"TLS to etcd: {what} (env {env})")
    ap.add_argument("-o", "--output", choices=["table", "json"], default="table")
    groups: dict[str, Any] = {"parser": ap,
                              "root": ap.add_subparsers(dest="cmd", required=True)}
    for register in (*BUILTIN, *extra):
        register(groups)
    return ap


def main(argv: Sequence[str] | None = None, extra: Sequence[Registrar] = ()) -> int:
    import structlog

    from telemetry import logs

    args = build_parser(extra).parse_args(argv)
    # stdout is the command's output (`-o json` is parsed by scripts): a log line from
    # any module a command uses goes to stderr, warnings only.  The daemons set their own
    # logging; an in-process caller (tests, `vmha web`) gets its own set-up back.
    saved = structlog.get_config()
    logs.setup(level="warning")
    try:
        return _dispatch(args)
    finally:
        structlog.configure(**saved)


def _dispatch(args: argparse.Namespace) -> int:
    from store.etcd import StoreRejected, StoreUnavailable

    try:
        return int(args.fn(args))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except StoreUnavailable as exc:
        print(f"error: etcd unreachable at {args.etcd}: {exc}", file=sys.stderr)
        return EXIT_ETCD
    except StoreRejected as exc:  # etcd answered no (e.g. permission denied): not an outage
        print(f"error: etcd at {args.etcd} refused the request: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except ValueError as exc:  # e.g. a malformed --etcd value
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
