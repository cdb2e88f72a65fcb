# Two commands for a new user: `make run` and `make test`. Both set up the
# virtual environment themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROTOS := $(wildcard protos/orgbilling/v1/*.proto)

.PHONY: run test test-tools protos check-generated lint-protos bench seed-data bench-reports soak fuzz clean

$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("Python 3.11 or newer is needed, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

run: venv
	$(BIN)/orgbilling serve

test: venv check-generated lint-protos test-tools
	$(BIN)/python -m pytest -q

# Programs some tests need beyond Python: PgBouncer (tests/test_pgbouncer.py).
# Run as root on Debian, installs its package when missing; never fails, so
# that without it those tests skip and say why.
test-tools:
	@command -v pgbouncer >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null \
	  || DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >/dev/null \
	  || { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null \
	       && DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >/dev/null; } \
	  || echo "make: pgbouncer could not be installed; the PgBouncer tests will skip"

# Regenerates generated/ from protos/.
protos: venv
	$(BIN)/python -m tools.gen_protos generated

# Fails when generated/ is not what `make protos` would write.
check-generated: venv
	$(BIN)/python -m tools.gen_protos --check generated

lint-protos: venv
	$(BIN)/buf lint

bench: venv
	$(BIN)/python -m benchmarks.run

# The reporting benchmark's data (once; reused) and the benchmark itself:
# see benchmarks/README.md. SEED_ARGS / BENCH_REPORTS_ARGS pass options,
# e.g. SEED_ARGS="--scale 0.01".
seed-data: venv
	$(BIN)/python -m benchmarks.seed_data $(SEED_ARGS)

bench-reports: venv
	$(BIN)/python -m benchmarks.reports $(BENCH_REPORTS_ARGS)

soak: venv
	$(BIN)/python -m tests.bank.soak $(SOAK_ARGS)

fuzz: venv
	$(BIN)/python -m pytest -q tests/test_fuzz.py --fuzz-examples=$${FUZZ_EXAMPLES:-2000}

clean:
	rm -rf $(VENV) .orgbilling .pytest_cache
