"""Fencing: proving a lost node runs nothing before its VMs boot elsewhere.

`fencing.policy` holds the pure rules (timing validation, guard timing, the fence
window, the per-cluster fence policy); `fencing.lease` is the agent-side keepalive and
self-fence deadline; `fencing.guard` is the separate guard process that fences the
host when the agent stops renewing (frozen, killed); `fencing.agents` runs external
fence agents (ClusterLabs convention) and `fencing.fence_vmha` is the built-in one;
`cli.fence` adds `vmha node confirm-off` and `vmha fence list`.
"""
