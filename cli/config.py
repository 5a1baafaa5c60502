"""`vmha config`: validate a cluster config (a file or the one in etcd) against the
timing rules, write one to etcd, show the one in etcd."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cli.cluster import open_cluster
from cli.common import EXIT_INPUT, CliError, _out
from cli.vm import refuse_oversized
from schemas import ClusterConfig, Keyspace, SchemaError
from schemas.secrets import plain_secrets, redact_config


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


def _unsafe(cfg: ClusterConfig) -> list[str]:
    """The timing rules `cfg` breaks, each printed to stderr (with a warning for each
    secret kept in clear: etcd is readable by every node)."""
    from fencing.policy import validate_timing

    for where in plain_secrets(cfg.model_dump(by_alias=True, mode="json")):
        print(f"warning: {where} is stored in etcd in clear, readable by every node; give "
              'it as {"credential": "NAME"} (a file in the orchestrator\'s '
              "$CREDENTIALS_DIRECTORY, systemd LoadCredential=)", file=sys.stderr)
    problems = validate_timing(cfg)
    for p in problems:
        print(f"unsafe: {p}", file=sys.stderr)
    return problems


def cmd_config_validate(args: argparse.Namespace) -> int:
    if args.file:
        cfg = read_cluster_config(args.file)
    else:
        snap = open_cluster(args).snapshot()
        bad = [e for e in snap.errors if e.key == Keyspace(args.prefix).config]
        if bad:
            raise CliError(str(bad[0]), EXIT_INPUT)
        cfg = snap.config
    if _unsafe(cfg):
        return EXIT_INPUT
    print("config ok")
    return 0


def cmd_config_apply(args: argparse.Namespace) -> int:
    cfg = read_cluster_config(args.file)
    if _unsafe(cfg):
        print("refused: nothing written", file=sys.stderr)
        return EXIT_INPUT
    refuse_oversized(cfg.to_json(), args.file)
    cluster = open_cluster(args)
    rev = cluster.set_config(cfg)
    print(f"config written to {cluster.config_key} (revision {rev}); agents read it when "
          "they (re)register, the leader at its next cycle")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    snap = open_cluster(args).snapshot()
    # Secrets are never printed; credential references (file names) are.
    _out(args, redact_config(snap.config.model_dump(by_alias=True, mode="json")), None)
    return 0


def register(groups: dict[str, Any]) -> None:
    cfg = groups["root"].add_parser("config", help="cluster config").add_subparsers(
        dest="cfgcmd", required=True)
    groups["config"] = cfg
    val = cfg.add_parser("validate", help="check timing rules (file or the one in etcd)")
    val.add_argument("--file")
    val.set_defaults(fn=cmd_config_validate)
    app = cfg.add_parser("apply", help="validate a cluster config file and write it to etcd")
    app.add_argument("--file", required=True)
    app.set_defaults(fn=cmd_config_apply)
    cfg.add_parser("show", help="the cluster config in etcd").set_defaults(fn=cmd_config_show)
