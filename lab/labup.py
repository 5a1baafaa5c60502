"""`vmha lab up`: start a whole lab in the background, or restart what died of one.

Starts a real etcd (1 or 3 members; with auth on and the cluster on keyspace 2 unless
``--no-auth``), N lab libvirt nodes (one namespaced libvirtd
each), one node agent per node and two orchestrators, recording each in ``lab.json``
(:mod:`lab.labstate`) as soon as it runs.  Ctrl-C (or SIGTERM) during `up` tears down
everything it started (:func:`lab.labdown.teardown`).

For tests, ``VMHA_LAB_HOLD_AT=<phase>`` (one of :data:`HOLD_PHASES`: after etcd, after
every libvirt node, after every agent, after every process, once the cluster is ready)
makes `up` print ``lab up: holding at phase <phase>`` and wait there for a signal.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.common import EXIT_INPUT, CliError
from lab.labdown import teardown
from lab.labstate import (
    DIR_MARKER,
    ENV_FILE,
    EXIT_INTERRUPTED,
    OWNED,
    STATE_FILE,
    check_dir,
    cluster_state,
    etcd_recs,
    interrupts,
    load_state,
    missing_prerequisite,
    proc_alive,
    save_state,
    say,
    wait_progress,
)

if TYPE_CHECKING:
    from store.etcd import TlsFiles

#: Test hook: `up` announces this phase on stdout and blocks there until interrupted.
HOLD_ENV = "VMHA_LAB_HOLD_AT"
HOLD_PHASES = ("etcd", "nodes", "agents", "started", "ready")


def _operator_tls(lab_dir: Path, state: dict[str, Any]) -> TlsFiles | None:
    """The operator's credential of a lab with etcd auth on (None: auth off)."""
    from lab.etcdpki import EtcdPki, user

    return (EtcdPki(lab_dir / "nodes").client(user("operator", state.get("prefix", "/vmha")))
            if state.get("auth") else None)


def _cluster_ready(endpoints: str, nodes: list[str], tls: TlsFiles | None = None) -> bool:
    """A leader and every node registered (with ``tls``, auth on: keyspace 2's keys)."""
    from schemas.keys_v2 import KeyspaceV2
    from store.etcd import EtcdStore, StoreUnavailable

    store = EtcdStore(endpoints, retry_budget=0.5, tls=tls)
    try:
        if tls is not None:
            ks = KeyspaceV2()
            return store.get(ks.leader) is not None and all(store.get(ks.reg(n))
                                                             for n in nodes)
        snap = store.snapshot()
    except StoreUnavailable:
        return False
    finally:
        store.close()
    return snap.leader is not None and all(n in snap.nodes for n in nodes)


def _write_examples(lab_dir: Path) -> None:
    """Guest XML files an operator can `vmha vm add` (a kernel guest if it can be built)."""
    from lab import DEFAULT_CACHE, ArtifactError, kernel_guest_xml, tiny_guest_xml

    guests = lab_dir / "guests"
    guests.mkdir(exist_ok=True)
    (guests / "web1.xml").write_text(tiny_guest_xml("web1"))
    with contextlib.suppress(ArtifactError, OSError):
        (guests / "k1.xml").write_text(
            kernel_guest_xml("k1", DEFAULT_CACHE, guests / "k1.console.log"))


def _print_info(lab_dir: Path, state: dict[str, Any]) -> None:
    ep = state["etcd"]["endpoints"]
    node = state["nodes"][0]["name"]
    say(f"\nlab up in {lab_dir}: {len(state['nodes'])} libvirt nodes "
        f"({', '.join(n['name'] for n in state['nodes'])}), etcd {ep} "
        f"({len(etcd_recs(state))} member(s)), one agent per node, 2 orchestrators"
        + ("; migrations over TLS (lab CA in nodes/pki-ca-lab)" if state.get("tls") else "")
        + ("; etcd auth on, keyspace 2 (etcd CA and certificates in nodes/pki-ca-etcd)"
           if state.get("auth") else "; etcd without auth, keyspace 1 (--no-auth)"))
    say(f"  state: {lab_dir / STATE_FILE}    logs: {lab_dir / 'logs'}")
    if state.get("auth"):
        _print_auth_info(lab_dir, state)
        return
    say("\nTry (or `source " + str(lab_dir / ENV_FILE) + "` first and drop the flags):")
    say(f"  vmha --etcd {ep} status")
    say(f"  vmha --etcd {ep} vm add web1 --memory-mib 32 --xml {lab_dir / 'guests/web1.xml'}")
    if (lab_dir / "guests" / "k1.xml").exists():
        say(f"  vmha --etcd {ep} vm add k1 --memory-mib 96 --xml {lab_dir / 'guests/k1.xml'}"
            f"   # a Linux guest; tail -f {lab_dir / 'guests/k1.console.log'}")
    say(f"  etcdctl --endpoints {ep} get --prefix /vmha/ --keys-only")
    say(f"  etcdctl --endpoints {ep} lease revoke $(vmha --etcd {ep} -o json node list"
        f" | python3 -c 'import json,sys; print([n[\"lease_id\"] for n in json.load(sys.stdin)"
        f" if n[\"name\"] == \"{node}\"][0])')   # drain {node}")
    say(f"  vmha --etcd {ep} node uncordon {node}")
    say(f"  vmha lab status --dir {lab_dir}")
    say(f"  vmha lab down --dir {lab_dir}")


def _print_auth_info(lab_dir: Path, state: dict[str, Any]) -> None:
    """The examples of a lab with auth on: `vmha` and etcdctl as the operator (env.sh);
    as root or a node, their certificates set again on the command line."""
    from lab.etcdpki import ROOT, EtcdPki, node_user
    from schemas.keys_v2 import KeyspaceV2

    ks = KeyspaceV2(state.get("prefix", "/vmha"))
    node = state["nodes"][0]["name"]
    other = state["nodes"][-1]["name"]
    pki = EtcdPki(lab_dir / "nodes")
    # etcdctl refuses a flag that shadows its environment variable: as another user, the
    # variables are set again on the command line (vmha takes them the same way).
    as_root, as_node = (pki.client(ROOT), pki.client(node_user(node, ks.prefix)))
    say(f"\nTry, after `source {lab_dir / ENV_FILE}` (vmha and etcdctl log in as `operator`):")
    say("  vmha status")
    say(f"  vmha vm add web1 --memory-mib 32 --xml {lab_dir / 'guests/web1.xml'}")
    if (lab_dir / "guests" / "k1.xml").exists():
        say(f"  vmha vm add k1 --memory-mib 96 --xml {lab_dir / 'guests/k1.xml'}"
            f"   # a Linux guest; tail -f {lab_dir / 'guests/k1.console.log'}")
    say("  vmha vm list")
    say(f"  vmha node drain {node} --wait   # keyspace 2: a cordon; its VMs move live")
    say(f"  vmha node uncordon {node}")
    say(f"  VMHA_ETCD_CERT={as_root.cert} VMHA_ETCD_KEY={as_root.key} vmha node drain {node} "
        "--revoke   # the lease revoke: root's")
    say(f"  etcdctl get --prefix {ks.prefix}/ --keys-only")
    say(f"  ETCDCTL_CERT={as_node.cert} ETCDCTL_KEY={as_node.key} etcdctl put {ks.reg(other)} x"
        f"   # {node}'s certificate: refused")
    say(f"  vmha lab status --dir {lab_dir}")
    say(f"  vmha lab down --dir {lab_dir}")


def _write_env(lab_dir: Path, endpoints: str, tls: TlsFiles | None = None) -> None:
    text = ("# source this file to talk to the vmha lab\n"
            f"export VMHA_ETCD={endpoints}\nexport ETCDCTL_API=3\n")
    if tls is None:
        text += f"export ETCDCTL_ENDPOINTS={endpoints}\n"
    else:  # auth on: both log in as `operator`
        https = ",".join(f"https://{e}" for e in endpoints.split(","))
        text += (f"export ETCDCTL_ENDPOINTS={https}\n"
                 f"export VMHA_ETCD_CACERT={tls.cacert} ETCDCTL_CACERT={tls.cacert}\n"
                 f"export VMHA_ETCD_CERT={tls.cert} ETCDCTL_CERT={tls.cert}\n"
                 f"export VMHA_ETCD_KEY={tls.key} ETCDCTL_KEY={tls.key}\n")
    (lab_dir / ENV_FILE).write_text(text)


def _resume(args: argparse.Namespace, lab_dir: Path, state: dict[str, Any]) -> int:
    """`up` on an existing lab: restart what died, if etcd still runs."""
    from lab import start_node
    from lab.localcluster import Daemon

    names = [n["name"] for n in state.get("nodes", [])]
    if args.nodes not in (None, len(names)) or \
            args.etcd_members not in (None, len(etcd_recs(state))):
        raise CliError(f"a lab with {len(names)} node(s) and {len(etcd_recs(state))} etcd "
                       f"member(s) is already in {lab_dir}; `vmha lab down --dir {lab_dir}` "
                       "first", EXIT_INPUT)
    dead_etcd = [m["name"] for m in etcd_recs(state) if not proc_alive(m)]
    if dead_etcd or not names:
        raise CliError(f"the lab in {lab_dir} is broken (etcd {', '.join(dead_etcd)} not "
                       f"running); `vmha lab down --dir {lab_dir}`, then up again")
    # Neither --auth nor --no-auth: the lab as it is (either mode); a flag must match it.
    wanted = getattr(args, "auth", None)
    if wanted is not None and wanted != bool(state.get("auth")):
        raise CliError(f"the lab in {lab_dir} runs "
                       + ("with etcd auth (keyspace 2)" if state.get("auth")
                          else "without etcd auth (keyspace 1, --no-auth)")
                       + f"; `vmha lab down --dir {lab_dir}` first", EXIT_INPUT)
    if getattr(args, "tls", False) and not state.get("tls"):
        raise CliError(f"the lab in {lab_dir} runs without TLS; `vmha lab down --dir "
                       f"{lab_dir}` first", EXIT_INPUT)
    restarted = []
    for n in state["nodes"]:
        before = n.get("libvirtd_pid")
        node = start_node(lab_dir / "nodes", n["name"], n["index"],
                          tls_ca="lab" if state.get("tls") else None)
        if node.pid != before:
            restarted.append(f"libvirtd of {n['name']}")
        n["libvirtd_pid"] = node.pid
    for key, rec in state["daemons"].items():
        if proc_alive(rec):
            continue
        d = Daemon(key.split(":", 1)[1], list(rec["args"]), Path(rec["log"])).start()
        assert d.proc is not None
        rec["pid"], rec["argv"] = d.proc.pid, [sys.executable, "-m", "vmha", *d.args]
        restarted.append(key)
        save_state(lab_dir, state)
    save_state(lab_dir, state)
    say(f"lab already up in {lab_dir}" + (f"; restarted {', '.join(restarted)}"
                                          if restarted else " (nothing to do)"))
    tls = _operator_tls(lab_dir, state)
    wait_progress(lambda: _cluster_ready(state["etcd"]["endpoints"], names, tls), 30,
          "agents registered and a leader elected")
    _print_info(lab_dir, state)
    return 0


def start_phase(lc: Any, nodes: int) -> str | None:
    """The phase of ``LabCluster.start`` that ``lc`` (a LabCluster) has just completed."""
    if lc.etcd is not None and not lc.nodes:
        return "etcd"
    if len(lc.nodes) == nodes and not lc.agents:
        return "nodes"
    if len(lc.agents) == nodes and not lc.orchestrators:
        return "agents"
    return None


def hold_at(phase: str) -> None:
    """Test hook: with ``VMHA_LAB_HOLD_AT=<phase>`` announce the phase and block there
    until interrupted, so a test interrupts `up` at a defined point, not a guessed time."""
    if os.environ.get(HOLD_ENV) != phase:
        return
    say(f"lab up: holding at phase {phase} ({HOLD_ENV}); interrupt to go on")
    while True:
        signal.pause()  # SIGINT/SIGTERM raise KeyboardInterrupt out of here


def cmd_lab_up(args: argparse.Namespace) -> int:
    problem = missing_prerequisite()
    if problem:
        raise CliError(problem)
    from lab.cluster import LabCluster
    from lab.configs import LAB_CONFIG

    lab_dir = Path(args.dir).resolve()
    check_dir(lab_dir)
    if args.nodes is not None and not 1 <= args.nodes <= 9:
        raise CliError("--nodes must be 1..9", EXIT_INPUT)
    state = load_state(lab_dir)
    if state is not None:
        return _resume(args, lab_dir, state)
    args.nodes = args.nodes or 3
    args.etcd_members = args.etcd_members or 1
    if lab_dir.exists() and any(p.name in OWNED for p in lab_dir.iterdir()):
        raise CliError(f"{lab_dir} holds left-overs of a lab without {STATE_FILE}; "
                       f"`vmha lab down --dir {lab_dir}` removes them", EXIT_INPUT)
    created = not lab_dir.exists()
    lab_dir.mkdir(parents=True, exist_ok=True)
    if created:
        (lab_dir / DIR_MARKER).touch()
    names = tuple(f"n{i}" for i in range(1, args.nodes + 1))
    base = {"version": 1, "dir": str(lab_dir), "created_dir": created,
            "node_names": list(names), "started_at": time.time(), "prefix": args.prefix,
            "tls": bool(getattr(args, "tls", False)),
            # auth is the default; only --no-auth (auth False) turns it off
            "auth": getattr(args, "auth", None) is not False}
    started = time.monotonic()
    with interrupts():
        try:
            say(f"== vmha lab up: etcd ({args.etcd_members} member(s)), {len(names)} libvirt "
                f"nodes, {len(names)} agents, 2 orchestrators; state in {lab_dir}")
            save_state(lab_dir, base)
            lc = LabCluster(lab_dir / "nodes", lab_dir / "logs", node_names=names,
                            prefix=args.prefix, etcd_members=args.etcd_members,
                            etcd_dir=lab_dir / "etcd", tls=base["tls"], auth=base["auth"])
            def changed() -> None:
                save_state(lab_dir, cluster_state(lc, base))
                phase = start_phase(lc, len(names))
                if phase is not None:
                    hold_at(phase)

            lc.on_change = changed
            config = LAB_CONFIG.model_copy(update={"migration_tls": base["tls"]})
            lc.start(config.to_json())
            hold_at("started")
            state = cluster_state(lc, base)
            for n in state["nodes"]:
                n["libvirtd_pid"] = lc.nodes[n["name"]].pid
            save_state(lab_dir, state)
            tls = _operator_tls(lab_dir, base)
            _write_env(lab_dir, lc.endpoints, tls)
            say(f"   etcd at {lc.endpoints}; libvirtd nodes, agents and orchestrators started")
            wait_progress(lambda: _cluster_ready(lc.endpoints, list(names), tls), 40,
                  "agents registered and a leader elected")
            _write_examples(lab_dir)
            hold_at("ready")
        except KeyboardInterrupt:
            say("\ninterrupted: tearing the lab down")
            teardown(lab_dir, quiet=True)
            return EXIT_INTERRUPTED
        except BaseException as exc:
            say(f"lab up failed ({exc}); tearing down what it started")
            teardown(lab_dir, quiet=True)
            if isinstance(exc, CliError | SystemExit):
                raise
            raise CliError(f"lab up failed: {exc}") from exc
    _print_info(lab_dir, state)
    say(f"\n(up in {time.monotonic() - started:.1f} s)")
    return 0
