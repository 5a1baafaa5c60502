"""vmha's built-in fence agent: destroys a node's vmha-managed domains over libvirt.

ClusterLabs convention (key=value lines on stdin, exit 0 = success):

    uri=qemu+ssh://root@node2/system    (or fake:///dir/<node> for the fake hypervisor)
    action=off|on|reboot|status|monitor|metadata

off     destroy every active vmha-managed domain on that hypervisor (the host stays up;
        this fences the *guests*, which is what double-running is about)
status  exit 0 if a managed domain is active there ("on"), 2 if none is ("off")
on      nothing to do (vmha boots VMs itself); exit 0

It needs the remote libvirtd to answer: a host that is powered off or cut off
cannot be fenced this way (the action fails and the leader retries); use a power
fence device (fence_ipmilan, fence_redfish) for those.

    python -m fencing.fence_vmha < params
"""

from __future__ import annotations

import sys

from fencing.guard import destroy_managed, open_hypervisor
from hypervisor.base import HypervisorError


def main() -> int:
    params: dict[str, str] = {}
    for line in sys.stdin.read().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#"):
            params[key.strip()] = value.strip()
    action = params.get("action", "off")
    uri = params.get("uri") or params.get("vmha_uri") or ""
    if action == "metadata":
        print("<resource-agent name='fence_vmha' shortdesc='destroy vmha-managed domains'/>")
        return 0
    if action == "on":
        return 0
    if not uri:
        print("fence_vmha: no uri= given", file=sys.stderr)
        return 1
    try:
        hv = open_hypervisor(uri)
        if action in ("off", "reboot"):
            done, failed = destroy_managed(hv)
            print(f"destroyed {len(done)} domain(s)" + (f"; failed: {failed}" if failed else ""))
            return 1 if failed else 0
        if action in ("status", "monitor"):
            active = [n for n, d in hv.list_domains().items() if d.managed and d.active]
            print("on" if active else "off")
            return 0 if active or action == "monitor" else 2
    except HypervisorError as exc:
        print(f"fence_vmha: {exc}", file=sys.stderr)
        return 1
    print(f"fence_vmha: unknown action {action!r}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
