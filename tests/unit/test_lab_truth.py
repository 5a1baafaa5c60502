"""I1 on the lab's libvirt view: when a sample sees a VM on two nodes, LabTruth confirms
it by reading the nodes again, so that a switch-over between two reads, in either read
order, is not reported as a double run, and a real one still is."""

from __future__ import annotations

from lab.invariants import DoubleRunChecker, LabTruth


class ScriptedNodes:
    """node_domains answers from a list of views per node, one view per call (the last
    one repeats)."""

    node_names = ("n1", "n2", "n3")

    def __init__(self, views: dict[str, list[dict[str, str]]]) -> None:
        self.views = views
        self.calls = {n: 0 for n in self.node_names}

    def node_domains(self, name: str) -> dict[str, str]:
        seq = self.views.get(name, [{}])
        view = seq[min(self.calls[name], len(seq) - 1)]
        self.calls[name] += 1
        return view

    def ground_truth(self, include_migrating: bool = False) -> dict[str, list[str]]:
        truth: dict[str, list[str]] = {}
        for n in self.node_names:
            for vm, state in self.node_domains(n).items():
                if state == "running":
                    truth.setdefault(vm, []).append(n)
        return truth


def test_a_source_read_after_the_destination_that_still_says_running_is_no_double() -> None:
    # k0 moved n3 -> n2: n2 is read first (already resumed), then n3, whose libvirtd has
    # not yet handled its QEMU's stop; read again, n3 no longer runs it.
    nodes = ScriptedNodes({"n2": [{"k0": "running"}],
                           "n3": [{"k0": "running"}, {"k0": "migrating"}]})
    checker = DoubleRunChecker(LabTruth(nodes))
    checker.sample()
    assert checker.violations == [] and checker.transient_doubles == 1


def test_a_switch_over_between_two_reads_in_read_order_is_no_double() -> None:
    # k0 moved n1 -> n2: n1 read running before the switch-over, n2 after it.
    nodes = ScriptedNodes({"n1": [{"k0": "running"}, {}], "n2": [{"k0": "running"}]})
    checker = DoubleRunChecker(LabTruth(nodes))
    checker.sample()
    assert checker.violations == [] and checker.transient_doubles == 1


def test_a_vm_that_runs_on_two_nodes_is_reported() -> None:
    nodes = ScriptedNodes({"n2": [{"k0": "running"}], "n3": [{"k0": "running"}]})
    checker = DoubleRunChecker(LabTruth(nodes))
    checker.sample()
    assert [(v["vm"], v["nodes"]) for v in checker.violations] == [("k0", ["n2", "n3"])]
