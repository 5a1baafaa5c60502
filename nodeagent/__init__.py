"""The node agent: one per hypervisor; holds the node's lease and reconciles libvirt."""
