"""Schema models, key layout and snapshot parsing: what is accepted, what is refused, and how."""

from __future__ import annotations

import json
from typing import Any

import pytest

from schemas.errors import SchemaError
from schemas.keys import KeyRef, Keyspace, valid_name
from schemas.models import (
    AgentInfo,
    AliveRecord,
    Capacity,
    ClusterConfig,
    CordonMarker,
    FenceRecord,
    LeaderRecord,
    MigrationStats,
    Model,
    NodeRegistration,
    Placement,
    VmSpec,
    VmStatus,
)
from tests.unit.builders import (
    KS,
    alive_value,
    cluster,
    cordon_value,
    domain_xml,
    fence_value,
    leader_value,
    node_value,
    placement_value,
    raw,
    snapshot,
    spec_value,
    status_value,
)

KEY = "/vmha/some/key"


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(base)
    for k, v in changes.items():
        if v is _DROP:
            out.pop(k, None)
        else:
            out[k] = v
    return out


_DROP = object()

VALID: dict[str, tuple[type[Model], dict[str, Any]]] = {
    "config": (ClusterConfig, {"schema": 1, "lease_ttl_s": 2, "keepalive_interval_s": 0.4,
                               "self_fence_safety_s": 0.5, "fence_margin_s": 1.0}),
    "capacity": (Capacity, {"memory_mib": 4096, "vcpus": 2}),
    "agent": (AgentInfo, {"pid": 1, "hostname": "h", "version": "0.1"}),
    "node": (NodeRegistration, node_value("node-1")),
    "cordon": (CordonMarker, cordon_value("node-1")),
    "fence": (FenceRecord, fence_value("node-1")),
    "alive": (AliveRecord, alive_value("node-1")),
    "leader": (LeaderRecord, leader_value()),
    "spec": (VmSpec, spec_value("vm-1")),
    "placement-boot": (Placement, placement_value("vm-1", {"id": "p", "kind": "boot",
                                                           "node": "a"})),
    "placement-migrate": (Placement, placement_value("vm-1", {"id": "p", "kind": "migrate",
                                                              "node": "b", "from_node": "a"})),
    "placement-pending": (Placement, placement_value("vm-1", {"id": "p", "kind": "pending",
                                                              "node": None})),
    "migration-stats": (MigrationStats, {"total_ms": 12.5, "downtime_ms": None,
                                         "source": "a", "target": "b"}),
    "status": (VmStatus, status_value("vm-1", {"node": "a", "state": "paused",
                                               "placement_id": "p", "failed_target": "b",
                                               "migration": {"source": "a", "target": "b"}})),
}


@pytest.mark.parametrize(("model", "data"), list(VALID.values()), ids=list(VALID))
def test_valid_values_round_trip(model: type[Model], data: dict[str, Any]) -> None:
    value = model.from_json(json.dumps(data), key=KEY)
    assert isinstance(value, model)
    text = value.to_json()
    assert json.loads(text)["schema"] == 1
    assert text == json.dumps(json.loads(text), sort_keys=True)  # stable, sorted
    assert model.from_json(text) == value


def test_schema_field_defaults_to_version_1() -> None:
    data = _with(VALID["capacity"][1])
    assert "schema" not in data
    assert Capacity.parse_dict(data).schema_ == 1


def test_config_defaults() -> None:
    cfg = ClusterConfig()
    assert (cfg.lease_ttl_s, cfg.keepalive_interval_s, cfg.self_fence_safety_s,
            cfg.fence_margin_s, cfg.stop_timeout_s, cfg.max_migrations_per_node) == (
        6, 0.5, 1.0, 2.0, 30.0, 2)
    assert (cfg.keepalive_timeout_s, cfg.etcd_election_timeout_s) == (0.5, 1.0)


def test_models_are_frozen() -> None:
    cfg = ClusterConfig()
    with pytest.raises(ValueError, match="frozen"):
        cfg.lease_ttl_s = 3


NODE = VALID["node"][1]
SPEC = VALID["spec"][1]
PLACE = VALID["placement-boot"][1]
STATUS = VALID["status"][1]
CFG = VALID["config"][1]
FENCE = VALID["fence"][1]

# (model, data, field named by the error, words in the message)
INVALID: list[Any] = [
    pytest.param(ClusterConfig, _with(CFG, lease_ttl_s=0), "lease_ttl_s", "greater than",
                 id="config-ttl-zero"),
    pytest.param(ClusterConfig, _with(CFG, lease_ttl_s=61), "lease_ttl_s", "less than",
                 id="config-ttl-too-big"),
    pytest.param(ClusterConfig, _with(CFG, keepalive_interval_s=0), "keepalive_interval_s",
                 "greater than", id="config-keepalive-zero"),
    pytest.param(ClusterConfig, _with(CFG, fence_margin_s=-1), "fence_margin_s",
                 "greater than", id="config-margin-negative"),
    pytest.param(ClusterConfig, _with(CFG, max_migrations_per_node=0),
                 "max_migrations_per_node", "greater than", id="config-migrations-zero"),
    pytest.param(ClusterConfig, _with(CFG, stop_timeout_s="soon"), "stop_timeout_s",
                 "number", id="config-not-a-number"),
    pytest.param(ClusterConfig, _with(CFG, lease_ttl=5), "lease_ttl", "Extra inputs",
                 id="config-unknown-field"),
    pytest.param(Capacity, {"memory_mib": 0, "vcpus": 1}, "memory_mib", "greater than",
                 id="capacity-zero-memory"),
    pytest.param(Capacity, {"memory_mib": 1}, "vcpus", "Field required",
                 id="capacity-missing-vcpus"),
    pytest.param(NodeRegistration, _with(NODE, name="Node_1"), "name", "node name 'Node_1'",
                 id="node-bad-name"),
    pytest.param(NodeRegistration, _with(NODE, name="-a"), "name", "node name",
                 id="node-name-leading-dash"),
    pytest.param(NodeRegistration, _with(NODE, lease_id="xyz"), "lease_id", "invalid literal",
                 id="node-lease-not-hex"),
    pytest.param(NodeRegistration, _with(NODE, capacity={"memory_mib": 1024, "vcpus": 0}),
                 "capacity.vcpus", "greater than", id="node-nested-capacity"),
    pytest.param(NodeRegistration, _with(NODE, agent=_DROP), "agent", "Field required",
                 id="node-missing-agent"),
    pytest.param(NodeRegistration, _with(NODE, cpu={"model": "x", "flags": []}), "cpu.flags",
                 "Extra inputs", id="node-nested-unknown-field"),
    pytest.param(NodeRegistration, _with(NODE, hostname="h"), "hostname", "Extra inputs",
                 id="node-unknown-field"),
    pytest.param(CordonMarker, _with(cordon_value("a"), at=_DROP), "at", "Field required",
                 id="cordon-missing-at"),
    pytest.param(FenceRecord, _with(FENCE, method="ipmi"), "method", "'self'",
                 id="fence-bad-method"),
    pytest.param(FenceRecord, _with(FENCE, outcome="maybe"), "outcome", "'success'",
                 id="fence-bad-outcome"),
    pytest.param(LeaderRecord, _with(leader_value(), pid="x"), "pid", "integer",
                 id="leader-pid-not-int"),
    pytest.param(VmSpec, _with(SPEC, name="VM 1"), "name", "VM name 'VM 1'",
                 id="spec-bad-name"),
    pytest.param(VmSpec, _with(SPEC, name="x" * 64, domain_xml=domain_xml("x" * 64)), "name",
                 "1-63 chars", id="spec-name-too-long"),
    pytest.param(VmSpec, _with(SPEC, memory_mib=0), "memory_mib", "greater than",
                 id="spec-zero-memory"),
    pytest.param(VmSpec, _with(SPEC, state="paused"), "state", "'running'",
                 id="spec-bad-state"),
    pytest.param(VmSpec, _with(SPEC, domain_xml=domain_xml("other")), "",
                 "domain_xml <name> is 'other', expected 'vm-1'", id="spec-xml-name-differs"),
    pytest.param(VmSpec, _with(SPEC, domain_xml="<domain><memory>1</memory></domain>"), "",
                 "domain_xml <name> is None", id="spec-xml-no-name"),
    pytest.param(VmSpec, _with(SPEC, domain_xml="<domain><name>vm-1</name>"), "",
                 "domain_xml is not well-formed XML", id="spec-xml-malformed"),
    pytest.param(VmSpec, _with(SPEC, domain_xml="<network><name>vm-1</name></network>"), "",
                 "root element is <network>, expected <domain>", id="spec-xml-not-domain"),
    pytest.param(Placement, _with(PLACE, kind="pending"), "", "a pending placement has no node",
                 id="placement-pending-with-node"),
    pytest.param(Placement, _with(PLACE, node=None), "", "a boot placement needs a node",
                 id="placement-boot-without-node"),
    pytest.param(Placement, _with(PLACE, kind="migrate"), "", "migrate placement needs from_node",
                 id="placement-migrate-without-source"),
    pytest.param(Placement, _with(PLACE, kind="evict"), "kind", "'boot'",
                 id="placement-bad-kind"),
    pytest.param(Placement, _with(PLACE, scores={"a": "high"}), "scores.a", "number",
                 id="placement-bad-score"),
    pytest.param(VmStatus, _with(STATUS, state="shutoff"), "state", "'running'",
                 id="status-bad-state"),
    pytest.param(VmStatus, _with(STATUS, migration={"source": "a"}), "migration.target",
                 "Field required", id="status-nested-missing"),
    pytest.param(VmStatus, _with(STATUS, since=_DROP), "since", "Field required",
                 id="status-missing-since"),
]


@pytest.mark.parametrize(("model", "data", "field", "words"), INVALID)
def test_invalid_values_name_key_and_field(model: type[Model], data: dict[str, Any],
                                           field: str, words: str) -> None:
    with pytest.raises(SchemaError) as info:
        model.from_json(json.dumps(data), key=KEY)
    err = info.value
    assert err.key == KEY
    assert err.field == field
    assert words in err.message
    assert str(err).startswith(f"{KEY}: field '{field}': " if field else f"{KEY}: ")


@pytest.mark.parametrize("version", [0, 2, "1", None, 1.5])
def test_wrong_schema_version_refused(version: Any) -> None:
    data = _with(SPEC, schema=version)
    with pytest.raises(SchemaError) as info:
        VmSpec.from_json(json.dumps(data), key=KEY)
    assert info.value.key == KEY
    assert info.value.field == "schema"
    assert f"unsupported schema version {version!r}" in info.value.message
    assert "reads version 1" in info.value.message


@pytest.mark.parametrize(
    ("raw_value", "words"),
    [
        pytest.param(b"{not json", "not valid JSON", id="garbage"),
        pytest.param(b"", "not valid JSON", id="empty"),
        pytest.param(b"\xff\xfe\xfa", "not valid JSON", id="not-utf8"),
        pytest.param(b"[1, 2]", "expected a JSON object", id="list"),
        pytest.param(b"null", "expected a JSON object", id="null"),
        pytest.param(b'"text"', "expected a JSON object", id="string"),
    ],
)
def test_non_json_or_non_object_refused(raw_value: bytes, words: str) -> None:
    with pytest.raises(SchemaError) as info:
        ClusterConfig.from_json(raw_value, key=KEY)
    assert info.value.key == KEY
    assert info.value.field == ""
    assert words in info.value.message


def test_error_counts_further_problems() -> None:
    with pytest.raises(SchemaError) as info:
        Capacity.parse_dict({"memory_mib": 0, "vcpus": 0}, key=KEY)
    assert info.value.field == "memory_mib"
    assert info.value.message.endswith("(and 1 more)")


def test_schema_error_str_without_field() -> None:
    err = SchemaError("/vmha/x", "", "broken")
    assert str(err) == "/vmha/x: broken"
    assert isinstance(err, ValueError)


# ---- names and keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ok"),
    [("a", True), ("node-1", True), ("n.1_x-2", True), ("0", True), ("x" * 63, True),
     ("", False), ("x" * 64, False), ("Node", False), ("-a", False), ("a-", False),
     ("a/b", False), ("a b", False), (".a", False), ("a_", False)],
)
def test_valid_name(name: str, ok: bool) -> None:
    assert valid_name(name) is ok


@pytest.mark.parametrize("prefix", ["/vmha", "/a/b", "/x"])
@pytest.mark.parametrize(
    ("method", "kind", "name"),
    [("config", "config", ""), ("leader", "leader", ""), ("node", "node", "n1"),
     ("cordon", "cordon", "n1"), ("fence", "fence", "n1"), ("alive", "alive", "n1"),
     ("vm_spec", "vm_spec", "vm1"),
     ("vm_placement", "vm_placement", "vm1"), ("vm_status", "vm_status", "vm1")],
)
def test_keyspace_parse_round_trip(prefix: str, method: str, kind: str, name: str) -> None:
    ks = Keyspace(prefix)
    attr = getattr(ks, method)
    key = attr(name) if name else attr
    assert key.startswith(prefix + "/")
    assert ks.parse(key) == KeyRef(kind, name)


def test_keyspace_layout_is_stable() -> None:
    ks = Keyspace()
    assert ks.root == "/vmha/"
    assert ks.config == "/vmha/config"
    assert ks.leader == "/vmha/leader"
    assert ks.node("a") == "/vmha/nodes/a"
    assert ks.cordon("a") == "/vmha/cordon/a"
    assert ks.fence("a") == "/vmha/fence/a"
    assert ks.alive("a") == "/vmha/alive/a"
    assert ks.vm_spec("v") == "/vmha/vms/v/spec"
    assert ks.vm_placement("v") == "/vmha/vms/v/placement"
    assert ks.vm_status("v") == "/vmha/vms/v/status"


@pytest.mark.parametrize(
    "key",
    ["/other/config", "/vmha", "/vmhaX/config", "/vmha/", "/vmha/nodes", "/vmha/nodes/a/b",
     "/vmha/vms/v", "/vmha/vms/v/console", "/vmha/vms/v/spec/x", "/vmha/fencing/a",
     "/vmha/config/x", "vmha/config"],
)
def test_keyspace_parse_foreign_keys(key: str) -> None:
    assert Keyspace().parse(key) is None


@pytest.mark.parametrize("prefix", ["vmha", "/vmha/", "", "/"])
def test_keyspace_bad_prefix(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix must start with '/'"):
        Keyspace(prefix)


# ---- snapshots -----------------------------------------------------------------------------


def test_snapshot_from_builders() -> None:
    snap = cluster(revision=77, nodes={"a": (4096, 4), "b": (2048, 2)}, cordons=["b"],
                   fences={"x": 5}, specs={"vm1": (512, 1, "stopped")},
                   config={"lease_ttl_s": 2, "keepalive_interval_s": 0.4,
                           "self_fence_safety_s": 0.5, "fence_margin_s": 1.0},
                   extra=[raw(KS.leader, leader_value(), 3)])
    assert snap.revision == 77
    assert snap.errors == ()
    assert sorted(snap.nodes) == ["a", "b"]
    assert snap.nodes["a"].value.capacity == Capacity(memory_mib=4096, vcpus=4)
    assert snap.nodes["a"].key == "/vmha/nodes/a"
    assert snap.nodes["a"].lease == 0x1A2B
    assert snap.nodes["b"].value.cordoned is True
    assert snap.fences["x"].mod_revision == 5
    assert snap.specs["vm1"].value.state == "stopped"
    assert snap.config.lease_ttl_s == 2
    assert snap.config_entry is not None and snap.config_entry.key == "/vmha/config"
    assert snap.leader is not None and snap.leader.value.id == "leader-1"
    assert snap.is_cordoned("b") and not snap.is_cordoned("a")
    assert snap.schedulable("a")
    assert not snap.schedulable("b")  # cordoned
    assert not snap.schedulable("x")  # not registered


def test_snapshot_default_config_when_absent() -> None:
    snap = snapshot([])
    assert snap.config == ClusterConfig()
    assert snap.config_entry is None
    assert snap.leader is None
    assert snap.errors == ()


@pytest.mark.parametrize(
    ("key", "value", "field", "words"),
    [
        pytest.param(KS.node("a"), node_value("b"), "name", "is 'b' but the key names 'a'",
                     id="node"),
        pytest.param(KS.cordon("a"), cordon_value("b"), "node", "key names 'a'", id="cordon"),
        pytest.param(KS.fence("a"), fence_value("b"), "node", "key names 'a'", id="fence"),
        pytest.param(KS.alive("a"), alive_value("b"), "node", "key names 'a'", id="alive"),
        pytest.param(KS.vm_spec("v1"), spec_value("v2"), "name", "key names 'v1'", id="spec"),
        pytest.param(KS.vm_placement("v1"), PLACE, "vm", "is 'vm-1' but the key names 'v1'",
                     id="placement"),
        pytest.param(KS.vm_status("v1"), STATUS, "vm", "key names 'v1'", id="status"),
    ],
)
def test_snapshot_key_name_mismatch_is_an_error(key: str, value: dict[str, Any], field: str,
                                                words: str) -> None:
    snap = snapshot([raw(key, value, 9)])
    assert len(snap.errors) == 1
    err = snap.errors[0]
    assert (err.key, err.field) == (key, field)
    assert words in err.message
    assert not snap.nodes and not snap.cordons and not snap.fences
    assert not snap.specs and not snap.placements and not snap.statuses


def test_snapshot_keeps_good_entries_and_lists_bad_ones() -> None:
    good = raw(KS.vm_spec("ok"), spec_value("ok"), 11)
    bad_json = raw(KS.vm_spec("broken"), "{oops", 12)
    bad_version = raw(KS.node("n"), _with(node_value("n"), schema=2), 13)
    bad_field = raw(KS.vm_placement("ok"), _with(placement_value("ok", PLACE), kind="x"), 14)
    bad_config = raw(KS.config, {"lease_ttl_s": 0}, 15)
    foreign = raw("/elsewhere/vms/x/spec", "{garbage", 16)
    unknown = raw("/vmha/vms/ok/notes", "{garbage", 17)
    snap = snapshot([good, bad_json, bad_version, bad_field, bad_config, foreign, unknown])
    assert list(snap.specs) == ["ok"]
    assert snap.specs["ok"].mod_revision == 11
    assert not snap.nodes and not snap.placements
    assert snap.config == ClusterConfig()  # the refused config is not used
    assert snap.config_entry is None
    got = [(e.key, e.field) for e in snap.errors]
    # A key under the prefix that is not one of vmha's is reported too (issue 11: a name
    # with a slash must not vanish silently); a key outside the prefix is not vmha's.
    assert got == [(KS.vm_spec("broken"), ""), (KS.node("n"), "schema"),
                   (KS.vm_placement("ok"), "kind"), (KS.config, "lease_ttl_s"),
                   ("/vmha/vms/ok/notes", "")]


def test_snapshot_revisions_and_lease_kept() -> None:
    snap = snapshot([raw(KS.node("a"), node_value("a"), mod_revision=30, create_revision=20,
                         lease=0xBEEF)], revision=31)
    entry = snap.nodes["a"]
    assert (entry.create_revision, entry.mod_revision, entry.lease) == (20, 30, 0xBEEF)
    assert snap.revision == 31


def test_cluster_builder_strict_refuses_bad_data() -> None:
    with pytest.raises(AssertionError, match="test data refused"):
        cluster(extra=[raw(KS.vm_spec("a"), spec_value("b"))])
    snap = cluster(extra=[raw(KS.vm_spec("a"), spec_value("b"))], strict=False)
    assert len(snap.errors) == 1


def test_snapshot_reads_the_liveness_key_and_refuses_a_bad_one() -> None:
    snap = snapshot([raw(KS.alive("n1"), alive_value("n1", "ab12"), 7),
                     raw(KS.alive("n2"), {"schema": 1, "node": "n2"}, 8)])
    assert snap.alive["n1"].value.lease_id == "ab12"
    assert "n2" not in snap.alive
    assert [(i.key, i.kind, i.name) for i in snap.invalid] == [(KS.alive("n2"), "alive", "n2")]
    assert snap.invalid_nodes == frozenset(), "a bad liveness key decides nothing"
