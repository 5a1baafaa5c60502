"""Fencing: proving a lost node runs nothing before its VMs boot elsewhere.

`fencing.policy` holds the pure rules (timing validation, when a lost node counts
as fenced); `fencing.selffence` is the agent-side deadline that destroys local
domains before the node's lease can expire on the server.
"""
