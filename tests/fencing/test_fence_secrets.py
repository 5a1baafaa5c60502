"""Fence secrets: credentials read from files on the orchestrator host (systemd's
LoadCredential=, $CREDENTIALS_DIRECTORY), never stored in etcd; control characters
refused in every fence parameter, name and URI."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fencing.agents import fence_off
from schemas import SchemaError
from schemas.models import ClusterConfig, FenceDevice, NodeRegistration
from schemas.secrets import CredentialRef

SECRET = "s3cret-Pw_91"
# An agent that logs the stdin it gets, then answers like a fence agent: off succeeds,
# status says off.  With `echo` it prints its stdin and fails instead.
AGENT = """\
import sys
text = sys.stdin.read()
with open(sys.argv[1], "a") as f:
    f.write(text + "--\\n")
if len(sys.argv) > 2:
    print(text.replace("\\n", " "))
    sys.exit(1)
sys.exit(2 if "action=status" in text else 0)
"""


def agent(tmp: Path, *extra: str) -> tuple[list[str], Path]:
    script = tmp / "fake_fence.py"
    script.write_text(AGENT)
    log = tmp / "stdin.log"
    return [sys.executable, str(script), str(log), *extra], log


def creds(tmp: Path, monkeypatch: pytest.MonkeyPatch, **files: str) -> Path:
    d = tmp / "creds"
    d.mkdir()
    for name, value in files.items():
        (d / name).write_text(value)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(d))
    return d


def test_credential_reaches_the_agent_on_stdin(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    argv, log = agent(tmp_path)
    creds(tmp_path, monkeypatch, **{"ipmi-n1-password": SECRET + "\n"})
    dev = FenceDevice.parse_dict({"agent": argv, "params": {
        "ip": "10.0.0.11", "username": "admin",
        "password": {"credential": "ipmi-n1-password"}}})
    assert SECRET not in dev.to_json()  # what `config apply` writes to etcd
    r = fence_off(dev, "n1", "qemu+ssh://n1/system")
    assert r.ok, r
    lines = log.read_text().split("--\n")[0].splitlines()
    assert lines == ["ip=10.0.0.11", f"password={SECRET}", "username=admin", "action=off"]
    assert SECRET not in r.detail


def test_missing_credential_fails_without_running_the_agent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv, log = agent(tmp_path)
    creds(tmp_path, monkeypatch)
    dev = FenceDevice.parse_dict({"agent": argv,
                                  "params": {"password": {"credential": "absent"}}})
    r = fence_off(dev, "n1", "")
    assert not r.ok and "credential 'absent'" in r.detail, r
    assert not log.exists()
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    r = fence_off(dev, "n1", "")
    assert not r.ok and "CREDENTIALS_DIRECTORY" in r.detail, r
    assert not log.exists()


def test_credential_with_a_newline_inside_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv, log = agent(tmp_path)
    creds(tmp_path, monkeypatch, pw="abc\npassword_script=/tmp/x\n")
    dev = FenceDevice.parse_dict({"agent": argv, "params": {"password": {"credential": "pw"}}})
    r = fence_off(dev, "n1", "")
    assert not r.ok and "control character" in r.detail and "password_script" not in r.detail
    assert not log.exists()


def test_uri_with_a_newline_is_not_substituted(tmp_path: Path) -> None:
    argv, log = agent(tmp_path)
    dev = FenceDevice(agent=argv, params={"uri": "{uri}"})
    r = fence_off(dev, "n1", "qemu+ssh://n1/system\npassword_script=/tmp/evil")
    assert not r.ok and "control character" in r.detail and "U+000A" in r.detail, r
    assert not log.exists()


def test_agent_output_echoing_a_secret_is_scrubbed(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    argv, log = agent(tmp_path, "echo")
    creds(tmp_path, monkeypatch, pw=SECRET)
    dev = FenceDevice.parse_dict({"agent": argv, "params": {
        "password": {"credential": "pw"}, "passwd": "plain-in-config"}})
    r = fence_off(dev, "n1", "")
    assert not r.ok and "exited 1" in r.detail
    assert SECRET in log.read_text()
    assert SECRET not in r.detail and "plain-in-config" not in r.detail, r.detail


@pytest.mark.parametrize("device", [
    {"agent": ["/usr/sbin/fence_ipmilan"], "params": {"ip": "10.0.0.1\npassword_script=x"}},
    {"agent": ["/usr/sbin/fence_ipmilan"], "params": {"ip\n": "10.0.0.1"}},
    {"agent": ["/usr/sbin/fence_ipmilan"], "params": {"a=b": "1"}},
    {"agent": ["/usr/sbin/fence_ipmilan"], "params": {"ip": "10.0.0.1\x7f"}},
    {"agent": ["/usr/sbin/fence_ipmilan\x00"]},
    {"agent": ["x"], "params": {"password": {"credential": "../etc/shadow"}}},
    {"agent": ["x"], "params": {"password": {"credential": "pw", "extra": 1}}},
])
def test_fence_device_refuses_control_characters(device: dict[str, object]) -> None:
    with pytest.raises(SchemaError):
        FenceDevice.parse_dict(device)


def test_fence_device_keys_refuse_control_characters() -> None:
    with pytest.raises(SchemaError):
        ClusterConfig.parse_dict({"fence_devices": {"n1\n": {"agent": ["x"]}}})
    assert ClusterConfig.parse_dict({"fence_devices": {"*": {"agent": ["x"]}}})


@pytest.mark.parametrize("field", ["libvirt_uri", "migration_address"])
def test_registration_uri_with_control_characters_is_refused(field: str) -> None:
    reg = {"name": "n1", "lease_id": "1f", "libvirt_uri": "qemu:///system",
           "migration_address": "10.0.0.1", "capacity": {"memory_mib": 1, "vcpus": 1},
           "agent": {"pid": 1, "hostname": "h", "version": "0"}, "registered_at": 0}
    assert NodeRegistration.parse_dict(reg)
    with pytest.raises(SchemaError, match="control character"):
        NodeRegistration.parse_dict({**reg, field: reg[field] + "\npassword_script=/tmp/x"})


def test_log_fields_named_like_secrets_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    import structlog

    from telemetry import logs

    logs.setup("json")
    try:
        structlog.get_logger().info("probe", password=SECRET, api_token=SECRET, node="n1")
    finally:
        structlog.reset_defaults()
    err = capsys.readouterr().err
    assert '"node": "n1"' in err and SECRET not in err and "<redacted>" in err


def test_missing_credentials_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fencing.agents import missing_credentials

    creds(tmp_path, monkeypatch, here=SECRET)
    cfg = ClusterConfig.parse_dict({"fence_devices": {
        "*": {"agent": ["x"], "params": {"password": {"credential": "here"}}},
        "n2": {"agent": ["x"], "params": {"password": {"credential": "gone"}}}}})
    assert missing_credentials(cfg) == ["gone"]


def test_shipped_cluster_toml_fence_example_parses(tmp_path: Path) -> None:
    from cli.config import read_cluster_config

    root = Path(__file__).resolve().parents[2]
    text = (root / "deploy/etc/cluster.toml").read_text()
    block = text[text.index("#fence_policy"):]
    uncommented = text.replace(block, "\n".join(line.removeprefix("#")
                                                 for line in block.splitlines()))
    (tmp_path / "cluster.toml").write_text(uncommented)
    cfg = read_cluster_config(str(tmp_path / "cluster.toml"))
    assert cfg.fence_devices["hv1"].params["password"] == CredentialRef(
        credential="ipmi-hv1-password")
