"""The orchestrator: leader election, placement decisions, the CLI and the demo."""
