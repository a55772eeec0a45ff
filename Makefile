# nydus-core developer entry points. `make test` is what CI runs (.ci/run): it installs everything
# a fresh Debian 12 machine needs (as root), builds .venv, then lints, type-checks and tests.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Hard cap for the whole pytest run, so a hung daemon cannot eat CI's 90 minutes.
PYTEST_TIMEOUT ?= 1500
PYTEST_ARGS ?= --durations=15
BENCH_ARGS ?=

PLUGIN_PROJECTS := $(wildcard plugins/*/pyproject.toml)
DIST ?= dist
STAMP := $(VENV)/.nydus-installed

.PHONY: test test-integration lint typecheck pytest demo proto bench-ops bench-failover bench bench-full system venv dist clean peer

test: system venv peer lint pytest

system:
	bash scripts/setup-system.sh

# The Go stargz-snapshotter 0.12 (bench/peers/stargz-grpc: Debian's packaged Go sources, about a
# minute, apt-installs Go the first time), the yardstick of bench/startup and its smoke test.
PEER_BIN ?= /var/cache/nydus-core-tests/peer-bin
peer:
	test -x $(PEER_BIN)/containerd-stargz-grpc || PEER_BIN=$(PEER_BIN) bash bench/peers/stargz-grpc/build.sh

# Reinstall only when the packaging metadata changed (editable installs pick up code changes).
venv: $(STAMP)
$(STAMP): pyproject.toml $(PLUGIN_PROJECTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]' $(foreach p,$(PLUGIN_PROJECTS),-e $(dir $(p)))
	touch $@

# Wheels of nydus-core and of every plugin distribution, for
# `pip install --find-links dist 'nydus-core[fuse]'` (dependencies come from the index).
dist: venv
	rm -rf $(DIST)
	$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir $(DIST) . $(dir $(PLUGIN_PROJECTS))
	rm -rf build $(addsuffix build,$(dir $(PLUGIN_PROJECTS)))  # setuptools' scratch space
	@ls -1 $(DIST)

# mypy's configured files are the package; the benchmark, scripts and integration tests are
# checked too because they are the package's first users.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/mypy bench scripts tests/integration
	# one run per test dir: each has its own conftest module (same module name); a plugin's
	# top-level test files apart from its test subdirectories for the same reason
	for d in tests/*/ $(wildcard plugins/*/tests/*/); do \
	  ls "$$d"*.py >/dev/null 2>&1 || continue; $(BIN)/mypy "$$d" || exit 1; done  # data dirs have none
	for p in $(wildcard plugins/*/tests); do $(BIN)/mypy $$p/*.py || exit 1; done

typecheck: venv
	$(BIN)/mypy

# pytest's exit code 5 ("no tests collected") is a failure here on purpose.
pytest: venv
	timeout --signal=INT --kill-after=60 $(PYTEST_TIMEOUT) $(BIN)/pytest $(PYTEST_ARGS)

# Only the tests that start containerd, a registry and the snapshotter (marker `containerd`).
test-integration: system venv
	$(BIN)/pytest -m containerd $(PYTEST_ARGS)

demo: system venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python scripts/demo.py

proto: venv
	PATH="$(abspath $(BIN)):$$PATH" sh scripts/gen_proto.sh

bench-ops: system venv
	$(BIN)/python bench/snapshot_ops.py $(BENCH_ARGS)

# Failover pauses (issue 5, bench/README.md): kill -9 of a FUSE daemon 20 times under read load,
# with a warm standby and cold, against the longest reader op of the same run without kills.
bench-failover: system venv
	$(BIN)/python bench/failover.py $(BENCH_ARGS)

# Container startup (issue 6, bench/startup/README.md): quick grid {unshaped, 100 Mbit/s + 20 ms},
# busybox + python, 3 samples (< 15 min); bench-full adds 25 Mbit/s + 50 ms and 3 MB/s + 100 ms,
# python-big and gcc, 5 samples. Results, table and charts go to bench/startup/results/.
bench: system venv peer
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/startup/run.py --grid quick -n 3 $(BENCH_ARGS)

bench-full: system venv peer
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/startup/run.py --grid full -n 5 --images busybox,python,python-big,gcc $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DIST) .pytest_cache .mypy_cache .ruff_cache
