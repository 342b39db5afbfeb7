# neardup: every target sets itself up; `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
EXTRAS ?= cpu,dev
# Keras looks for ImageNet weights here; a writable folder inside the project by default.
export KERAS_HOME ?= $(CURDIR)/.keras
export PYSPARK_PYTHON := $(CURDIR)/$(PY)
export PYSPARK_DRIVER_PYTHON := $(CURDIR)/$(PY)
SHARED ?= $(CURDIR)/../shared

.PHONY: setup demo test bench lint lock seed-weights clean

$(VENV)/.installed: setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

# Offline weights for tests and benchmarks: copy (never link) the shared Keras cache files
# into the writable KERAS_HOME. Users with internet access need nothing here.
seed-weights:
	@if [ -d "$(SHARED)/weights/keras-cache/models" ]; then \
	  mkdir -p "$(KERAS_HOME)/models" && cp -n "$(SHARED)"/weights/keras-cache/models/* "$(KERAS_HOME)/models/" ; \
	fi

demo: setup seed-weights
	$(VENV)/bin/neardup demo --workdir demo-work

test: setup seed-weights
	@command -v chromium >/dev/null 2>&1 || echo "NOTE: the report's browser test is skipped without Chromium; install it with: sudo apt-get update && sudo apt-get install -y chromium"
	$(VENV)/bin/pytest -q tests

bench: setup seed-weights
	$(PY) bench/bench_embed.py --data "$(SHARED)/data/ukbench-dev" --out bench/results

lint: setup
	$(VENV)/bin/ruff check pipeline jobs tests bench

# Re-pin after changing dependencies: the CPU set from the venv, the GPU extra kept by hand.
lock:
	{ sed -n '1,3p' constraints.txt; $(PIP) freeze --exclude-editable | grep -iv '^neardup'; \
	  sed -n '/^# GPU extra/,$$p' constraints.txt; } > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf demo-work demo-work-corpus demo-work-corpus-groundtruth.csv spark-warehouse .pytest_cache
