VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: docs setup setup-lab demo demo-fake test test-unit test-integration test-lab lint check \
        bench bench-etcd-faults bench-keepalive bench-lab-drains bench-liveness bench-paging bench-placement bench-scale campaign evidence clean bless clean-caches fuzz

setup:
	bash scripts/setup.sh

# setup plus the lab's apt packages and the Linux guest's kernel (root).
setup-lab:
	VMHA_LAB=1 bash scripts/setup.sh

# The demo on the lab: real etcd, libvirt nodes, QEMU guests (root; < 1 min).
demo: setup-lab
	$(PY) -m vmha demo

# The same story on the fake hypervisor (no root, no QEMU; ~15 s).
demo-fake: setup
	$(PY) -m vmha demo --fake

# Every test: unit, integration and the lab suite (tests/lab; its tests skip, saying why,
# without root, unshare, libvirtd or QEMU).
# Two workers: the suite mostly waits (on etcd leases, guards, guests), so two share
# CI's 2 cores; tests/conftest.py says which tests stay together.
TEST_WORKERS ?= 2

test: setup
	$(PYTEST) -q -n $(TEST_WORKERS) --dist loadfile

test-unit: setup
	$(PYTEST) -q tests/unit

test-integration: setup
	$(PYTEST) -q -m integration

# Real QEMU guests under namespaced libvirt daemons (root; installs the lab packages).
# `vmha lab up`, the demo and the migration-TLS lab run with etcd auth (keyspace 2), one
# lab on --no-auth; the other tests on a LabCluster run keyspace 1 (docs/keyspace-v2.md,
# part 6, "Left").
test-lab: setup-lab
	$(PYTEST) -q -m lab tests/lab

# Rewrite the expected logs of the scenario tests (tests/scenarios/*/expected.log) from
# the planners' current decisions: all, or one with SCENARIO=name.  Review the diff.
bless: setup
	VMHA_BLESS=1 $(PYTEST) -q "tests/scenarios/test_scenarios.py$(if $(SCENARIO),::test_scenario[$(SCENARIO)])"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Lint first (fast), then every test.
check: lint test

bench: setup
	mkdir -p results
	$(PY) -m bench.lease_loss --trials 50 --out results/bench-lease-loss.json

# etcd member faults (issue 11) with the default config: SIGSTOP, SIGKILL + restart,
# rolling restart, client traffic dropped at a proxy, a member cut off the network (root:
# each member in its own network namespace, its packets dropped by nftables), forced raft
# leader change on a 3-member etcd under 3 fake agents and 6 VMs; ROUNDS of each, STALL s
# per stall/drop/cut; exit 1 on any guard fire, self-fence, fence record, moved VM or
# daemon exit (~6 min per round with STALL=30).
bench-etcd-faults: setup
	mkdir -p results
	$(PY) -m bench.etcd_faults --rounds $(or $(ROUNDS),3) --stall $(or $(STALL),30) \
		--keyspace $(or $(KEYSPACE),1) --out results/bench-etcd-faults.json

# Paged reads at full size (docs/keyspace-v2.md, section 3): KEYS keys of VALUE_BYTES (default
# 33,000 of 4 kB, i.e. 10,000 VMs) on one etcd, read under gRPC's default 4 MiB receive limit:
# one range fails, pages at one revision succeed, a WatchedState lists and follows them.
bench-paging: setup
	mkdir -p results
	$(PY) -m bench.paging --keys $(or $(KEYS),33000) --value-bytes $(or $(VALUE_BYTES),4096) \
		--out results/bench-paging.json

# Keyspace 2 at scale (docs/keyspace-v2.md, part 8): 3 etcd members, NODES (default 50 200
# 1000) real agents in processes of PER_PROCESS (50) on the record-only fake hypervisor,
# 10 VMs a node with 4 kB domain XML, the leader in its own process; etcd's /metrics over
# registration, boot, IDLE_S (60) idle, one node crash, one drain, a leader restart; JSON
# and Markdown in results/.  CONFIG: cluster config fields as JSON (default: the
# defaults), AGENT_POLL: the agents' poll (1 s), LABEL: the runs' key prefix,
# AGENTS_NICE: the agent processes' niceness (10; 0 for none: they stand for other
# machines).  On a 2-core box the default config fits 50 nodes, not 200
# (results/bench-scale.md).
bench-scale: setup
	mkdir -p results
	$(PY) -m bench.scale --nodes $(or $(NODES),50 200 1000) --idle-s $(or $(IDLE_S),60) \
		--agents-per-process $(or $(PER_PROCESS),50) --agent-poll $(or $(AGENT_POLL),1) \
		$(if $(CONFIG),--config '$(CONFIG)') $(if $(LABEL),--label $(LABEL)) \
		$(if $(AGENTS_NICE),--agents-nice $(AGENTS_NICE)) \
		--out results/bench-scale.json

# The CPU cost of lease renewal (docs/keyspace-v2.md, part 4's keepalive stream): one etcd
# member, KEEPERS (default 50 100) real lease keepers in one process, two leases each,
# renewed every INTERVAL s (default: the default config's) for DURATION s (30); CPU ms per
# keeper-second and round latency p50/p99 (~1.5 min).
bench-keepalive: setup
	mkdir -p results
	nice -n 15 $(PY) -m bench.keepalive --keepers $(or $(KEEPERS),50 100) \
		--seconds $(or $(DURATION),30) $(if $(INTERVAL),--interval $(INTERVAL)) \
		$(if $(TIMEOUT),--timeout $(TIMEOUT)) $(if $(TTL),--ttl $(TTL)) \
		--out results/bench-keepalive.json

# Liveness fencing on keyspace 2 (docs/keyspace-v2.md, section 4): CRASHES crashes (SIGKILL
# of agent and guard service, guests killed) at TTL 3 on the fake hypervisor under
# liveness_fence bounded, then fast; crash -> fence record and crash -> running (~4 min).
bench-liveness: setup
	mkdir -p results
	$(PY) -m bench.liveness_crash --crashes $(or $(CRASHES),10) --out results/bench-liveness.json

# External fencing and drains on the lab (root; issue 12): ROUNDS drains by lease revoke and
# ROUNDS agent restarts with real QEMU guests must make no fence-agent call; a lost node must.
# On the lab `vmha lab up` starts: etcd auth on, keyspace 2 (root revokes the registration leases).
bench-lab-drains: setup-lab
	mkdir -p results
	$(PY) -m bench.lab_drains --rounds $(or $(ROUNDS),20) --out results/lab-drains-external.json

# The 2006 thesis's outage measurements on the lab (root; ~20 min; TRIALS per rate and kind):
# packets lost per graceful failure, vmha vs raw libvirt; tables, plots, JSON in results/outage.
# The lab as `vmha lab up` starts it: etcd auth, keyspace 2 (`vmha bench outage --no-auth`: 1).
evidence: setup-lab
	$(PY) -m vmha bench outage --trials $(or $(TRIALS),8) --raw-trials $(or $(TRIALS),8) \
		--out results/outage

# Placement (issue #5): vmha's planner vs crm_simulate and hbal on identical generated
# clusters (installs pacemaker-cli-utils and ganeti-htools); JSON and Markdown in results/.
bench-placement: setup
	command -v crm_simulate >/dev/null && command -v hbal >/dev/null || \
		apt-get install -y --no-install-recommends pacemaker-cli-utils ganeti-htools
	mkdir -p results
	$(PY) -m bench.placement --out results/bench-placement.json

# Fault campaign (fencing): seeded random faults on a 3-member etcd + fake hypervisor
# cluster; exit 1 on any invariant violation or needless self-fence.
# SEEDS/STEPS/MINUTES/JOBS (seeds run in parallel) to taste; KEYSPACE=2 runs the cluster
# on keyspace 2 (results/campaign-v2.json).
campaign: setup
	mkdir -p results
	$(PY) -m bench.campaign --seeds $(or $(SEEDS),1 2 3 4 5 6 7 8) --steps $(or $(STEPS),125) \
		--minutes $(or $(MINUTES),90) --jobs $(or $(JOBS),1) --timing $(or $(TIMING),default) \
		--keyspace $(or $(KEYSPACE),1) \
		--out results/campaign$(if $(filter 2,$(KEYSPACE)),-v2).json

# The same on the lab (root; real QEMU, tiny guests; ~5 min): SEED, FAULTS to taste.
# Keyspace 1 only, on etcd without auth (its history checker reads keyspace 1's keys).
campaign-lab: setup-lab
	mkdir -p results
	$(PY) -m bench.lab_campaign --seed $(or $(SEED),1) --faults $(or $(FAULTS),30) \
		--out results/campaign-lab.json

# Hostile values (hypothesis) written to every key pattern of a running 3-node fake
# cluster for FUZZ_MINUTES (default 10): 0 daemon exits, 0 VMs stopped or moved, every
# bad key listed by `vmha status`; results/fuzz.json (bench/fuzz.py says what counts).
fuzz: setup
	mkdir -p results
	FUZZ_MINUTES=$(or $(FUZZ_MINUTES),10) $(PY) -m bench.fuzz --out results/fuzz.json

# Regenerate docs/cli/*.md from real runs against a local cluster (PAGES=auth-setup,auth-check:
# those pages only).
docs: setup
	$(PY) scripts/gen_cli_docs.py $(if $(PAGES),--only $(PAGES))

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache results

# Every cache outside the clone (lab artifacts, apt archives, pip, /var/lib/vmha-lab,
# unused leftovers of tests and demos), so a fresh clone also means a fresh machine
# (root; DRY=1 only lists).  `make setup-lab` fetches everything again.
clean-caches:
	bash scripts/clean-caches.sh $(if $(DRY),--dry-run)
