# LoRA Lab developer commands. Everything installs itself through scripts/setup_host.sh.
PY := $(or $(LORALAB_HOME),$(HOME)/.cache/lora-lab)/venv/bin/python

.PHONY: setup demo test unit bench bench-quick bench-algorithms
setup:
	bash scripts/setup_host.sh

demo: setup
	$(PY) -m devkit.run_demo

test: setup
	$(PY) -m pytest tests -q

unit: setup
	$(PY) -m pytest tests/unit -q

bench: setup
	$(PY) bench/run_bench.py

bench-quick: setup
	$(PY) bench/run_bench.py --quick --out artifacts/bench-quick

bench-algorithms: setup
	$(PY) bench/algorithms.py
