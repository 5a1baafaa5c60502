"""The short cluster timings of the tests, the benchmarks, the demos and the lab.

Both pass the same validation (``fencing.policy.validate_timing``) as the production
defaults; they only make a lost node cost seconds instead of tens of seconds.
"""

from __future__ import annotations

from schemas import ClusterConfig

#: Tests and benchmarks on the fake hypervisor (and the lab end-to-end tests and fault
#: campaign, which check the same invariants on QEMU): short, so that a test or a fault
#: costs seconds.  A guest "stops" at once on the fake hypervisor, hence a 2 s stop
#: timeout.
#: The local etcd clusters run with a 500 ms election timeout (lab.localcluster), hence
#: ``etcd_election_timeout_s=0.5``; the TTL is the shortest that survives a member fault.
FAST_CONFIG = ClusterConfig(lease_ttl_s=3, keepalive_interval_s=0.3, keepalive_timeout_s=0.25,
                            etcd_election_timeout_s=0.5, self_fence_safety_s=0.5,
                            fence_margin_s=1.0, stop_timeout_s=2.0)

#: ``vmha lab up``, both demos (lab and fake, so that they tell the same numbers) and the
#: outage benchmark: what people watch and what docs/outage.md reports (measured with a
#: 3 s TTL, before the member-fault rule of fencing.policy raised it to 4 s).  A crash is
#: still recovered in seconds, with more headroom than FAST_CONFIG between keepalives and
#: the lease, and 5 s for a real guest's ACPI shutdown.
LAB_CONFIG = ClusterConfig(lease_ttl_s=4, keepalive_interval_s=0.4, keepalive_timeout_s=0.25,
                           etcd_election_timeout_s=0.5, self_fence_safety_s=0.75,
                           fence_margin_s=1.5, stop_timeout_s=5.0)

__all__ = ["FAST_CONFIG", "LAB_CONFIG"]
