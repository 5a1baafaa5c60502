"""The agent's gate of the domain XML policy (schemas.domain_policy): checked before a
domain is defined, so a spec written into etcd past `vmha vm add` defines nothing.

A refusal is a refused boot (nodeagent.failures): the error in the VM's status, retried
with backoff, given up after `max_boot_failures_per_node`, one `boot_failed` event per
distinct error.  The policy is the one in each snapshot's config, not the config the
agent started with: an allowance an operator adds applies at the next retry, without a
restart (a config that does not parse is read as the defaults).
"""

from __future__ import annotations

from typing import Any

from hypervisor.base import HypervisorRefused
from nodeagent.failures import ERROR_CHARS
from schemas.domain_policy import DomainPolicyError, check_domain_xml
from schemas.snapshot import ClusterSnapshot


class PolicyRefused(HypervisorRefused):
    """The domain XML policy refused the spec before the hypervisor saw it."""


def refuse_by_policy(vm: str, snap: ClusterSnapshot, lg: Any) -> None:
    """Raise PolicyRefused (a HypervisorRefused: handled as a refused boot) when the
    cluster's policy refuses the VM's domain XML.  Logged once per distinct refusal: a
    retry whose status already shows the same error logs only its `boot_refused`."""
    spec = snap.specs[vm].value
    try:
        check_domain_xml(spec.domain_xml, spec.name, snap.config)
    except DomainPolicyError as exc:
        error = str(exc)
        st = snap.statuses.get(vm)
        if st is None or st.value.error != error[:ERROR_CHARS]:
            lg.error("domain_policy_refused", error=error)
        raise PolicyRefused(error) from None
