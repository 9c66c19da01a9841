# Two commands for a fresh machine: `make demo` and `make test`. Each sets itself up with only what it needs:
# the demo the [server] extra, the tests [dev] (which includes [server]), the benchmarks [bench].
# One venv; one stamp per extra, so a later `make test` adds what the demo did not install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest workers for `make test` (pytest-xdist; 0: all in one process). Much of the suite waits on child
# processes, sockets and timeouts, so two workers take about 0.55 of the time of one, even on two cores.
# Each takes whole files (--dist loadfile): a module's shared cloud and its tests' order stay as they are;
# in the order tests/conftest.py gives them (longest first), not xdist's (most tests first).
TEST_WORKERS ?= 2

.PHONY: demo test bench setup mosquitto softhsm2 systemd-analyze cc clean

setup: $(STAMP)-dev mosquitto softhsm2 systemd-analyze cc

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# [dev] and [bench] include [server]: their stamps stand for it too.
$(STAMP)-server: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[server]'
	touch $@

$(STAMP)-dev $(STAMP)-bench: $(STAMP)-%: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[$*]'
	touch $@ $(STAMP)-server

# The stand-in runs its own Mosquitto; install it where missing (as root), else say what to do.
mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y mosquitto >/dev/null || { apt-get update >/dev/null && apt-get install -y mosquitto >/dev/null; }; \
	  else echo "Mosquitto 2.0 is required: run 'sudo apt-get install -y mosquitto' (or your system's equivalent)" >&2; exit 1; fi; }

# Keys in a PKCS#11 token are tested (and benchmarked) against SoftHSM2 (Debian's softhsm2: softhsm2-util
# and the module libsofthsm2.so); install it where missing (as root), else say what to do.
softhsm2:
	@command -v softhsm2-util >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y softhsm2 >/dev/null || { apt-get update >/dev/null && apt-get install -y softhsm2 >/dev/null; }; \
	  else echo "SoftHSM2 is required: run 'sudo apt-get install -y softhsm2' (or your system's equivalent)" >&2; exit 1; fi; }

# The tests verify the boot service's unit file with systemd-analyze (Debian's systemd package).
systemd-analyze:
	@command -v systemd-analyze >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y systemd >/dev/null || { apt-get update >/dev/null && apt-get install -y systemd >/dev/null; }; \
	  else echo "systemd-analyze is required: run 'sudo apt-get install -y systemd' (or your system's equivalent)" >&2; exit 1; fi; }

# The tests build a small PKCS#11 module in front of SoftHSM2 that can run out of room (tests/_support/tokens.py):
# a C compiler (Debian's gcc) is installed where missing (as root), else say what to do.
cc:
	@command -v cc >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y gcc libc6-dev >/dev/null || { apt-get update >/dev/null && apt-get install -y gcc libc6-dev >/dev/null; }; \
	  else echo "A C compiler is required by the tests: run 'sudo apt-get install -y gcc' (or your system's equivalent)" >&2; exit 1; fi; }

demo: $(STAMP)-server mosquitto
	$(BIN)/hub-onboard demo

test: $(STAMP)-dev mosquitto softhsm2 systemd-analyze cc
	$(BIN)/ruff format --check src tests bench
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: $(STAMP)-bench mosquitto softhsm2
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
