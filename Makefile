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

.PHONY: demo test venv data clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,plot]"
	touch $@

venv: $(VENV)/.installed

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

test: venv data
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .hypothesis
