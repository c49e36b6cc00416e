# kdfleet: `make demo` runs the whole fleet locally, `make test` runs the tests.
# Both create .venv and install what they need (Debian packages too, when root).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := agent,hub,train,demo,dev
# mosquitto: the broker (tests and demo); postgresql: the production database the tests also cover;
# chromium: the browser the dashboard tests drive; docker-compose: checks compose.yaml (tests/fleet)
APT_PACKAGES := mosquitto postgresql chromium docker-compose

.PHONY: demo test test-all bench lint system venv clean

demo: venv
	$(VENV)/bin/kdfleet demo $(DEMO_ARGS)

test: venv
	$(PY) -m pytest

test-all: venv
	$(PY) -m pytest -m "slow or not slow"

lint: venv
	$(VENV)/bin/ruff check kdfleet shared agent hub trainer tests bench

# the list of benchmarks; BENCH="agent --size 256" runs one (a full run of all of them takes hours)
bench: venv
	$(PY) -m bench $(BENCH)

venv: system $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

# Debian packages, installed only when missing and only when we may (root with apt-get).
system:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else \
	    echo "note: missing Debian packages:$$missing (install them as root; the tests that need them will skip)"; \
	  fi; \
	fi

clean:
	rm -rf $(VENV) var build *.egg-info
