# Two commands do all the set-up on a fresh Debian/Ubuntu machine with Python 3.10+:
#   make demo   — virtual environment, eclsnn, Fashion-MNIST (Debian package), then `eclsnn demo`
#   make test   — the same plus the test dependencies, then the whole test suite
# TORCH pins the PyTorch build (override e.g. `make test TORCH=torch==2.5.1`); a CPU build is enough.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
FMNIST_DIR := /usr/share/datasets/fashion-mnist
DEMO_OUT ?= demo-output

.PHONY: demo test venv zoo-deps data clean wheel-check

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,plot]"
	touch $@

venv: $(VENV)/.installed

# torchvision and timm for the zoo tests and benchmarks/zoo_coverage.py, pinned in tests/requirements-zoo.txt and
# installed with --no-deps so that pip never replaces the pinned torch (tests/vision_libs.py makes the model
# definitions importable where torchvision's compiled operators were built for another torch); then timm's own
# light dependencies.
$(VENV)/.zoo-installed: $(VENV)/.installed tests/requirements-zoo.txt
	$(PY) -m pip install --quiet --no-deps -r tests/requirements-zoo.txt
	$(PY) -m pip install --quiet huggingface_hub pyyaml safetensors
	touch $@

zoo-deps: $(VENV)/.zoo-installed

# Fashion-MNIST from the Debian package (as root or with sudo); otherwise say how to point at the files.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] || [ -n "$$ECLSNN_DATA" ]; then \
	  echo "Fashion-MNIST: found"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	elif command -v sudo >/dev/null; then \
	  sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST not found: install the Debian package dataset-fashion-mnist, or set ECLSNN_DATA=DIR"; exit 1; \
	fi

demo: venv data
	$(VENV)/bin/eclsnn demo --output $(DEMO_OUT)

test: venv zoo-deps data wheel-check
	$(VENV)/bin/lint-imports
	ECLSNN_REQUIRE_ZOO=1 $(PY) -m pytest -q

# The built wheel, installed (not editable) in a venv of its own, converts a checkpoint with a fresh kernel
# build from outside the source tree: a subpackage or package-data file (the C source) left out of the
# wheel fails here.
WHEEL_VENV ?= .venv-wheel
wheel-check: venv
	rm -rf dist-check $(WHEEL_VENV) wheel-check-out
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation -w dist-check . 2>/dev/null || $(PY) -m pip wheel --quiet --no-deps -w dist-check .
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(WHEEL_VENV)/bin/python -m pip install --quiet dist-check/eclsnn-*.whl
	cd /tmp && ECLSNN_KERNELS=on ECLSNN_CACHE_DIR=$(CURDIR)/wheel-check-out/cache $(CURDIR)/$(WHEEL_VENV)/bin/python -c \
	  "import eclsnn; assert 'site-packages' in eclsnn.__file__, eclsnn.__file__" && \
	  ECLSNN_KERNELS=on ECLSNN_CACHE_DIR=$(CURDIR)/wheel-check-out/cache $(CURDIR)/$(WHEEL_VENV)/bin/eclsnn convert \
	  $(CURDIR)/tests/fixtures/main-0.1.0/run -o $(CURDIR)/wheel-check-out/snn && \
	  ECLSNN_KERNELS=on ECLSNN_CACHE_DIR=$(CURDIR)/wheel-check-out/cache $(CURDIR)/$(WHEEL_VENV)/bin/python -c \
	  "import torch, eclsnn; from eclsnn.core.backends import cpu as kernels; m = torch.nn.Sequential(torch.nn.Linear(4, 4), eclsnn.ThresholdClip(levels=4)); \
	   s = eclsnn.simulate(eclsnn.convert(m), torch.randn(2, 4), 4); assert kernels.available(), kernels.build_error(); print('wheel check: ok')"
	rm -rf dist-check $(WHEEL_VENV) wheel-check-out build

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .hypothesis dist-check $(WHEEL_VENV) wheel-check-out
