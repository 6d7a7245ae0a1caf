# `make test` and `make parity` work on a fresh clone: they create .venv and install
# torch (first, pinned: an unpinned torch would pull CUDA wheels), TensorFlow, then this package.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TF_VERSION ?= 2.21.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-torch$(TORCH_VERSION)-tf$(TF_VERSION)
PARITY_ARGS ?=
BENCH_ARGS ?=

.PHONY: install test parity parity-quick bench clean

install: $(STAMP)

# tf-keras has TF1's layers (BasicLSTMCell, tf.layers) that the layout tests and the BiDAF port
# run; --no-deps, since it asks for the "tensorflow" dist, a second copy of tensorflow-cpu.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q tensorflow-cpu==$(TF_VERSION)
	$(PY) -m pip install -q --no-deps tf-keras==$(TF_VERSION)
	$(PY) -m pip install -q -e '.[tf,test,parity,checkpoint]' torch==$(TORCH_VERSION)
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

parity: $(STAMP)
	$(PY) -m parity $(PARITY_ARGS)

parity-quick: $(STAMP)
	$(PY) -m parity --quick $(PARITY_ARGS)

# Peer EMA libraries to time against; --no-deps keeps them from pulling anything (timm's
# ModelEmaV3 is loaded from its own file, without torchvision). Not package dependencies.
PEERS ?= torch-ema==0.3 ema-pytorch==0.8.3 timm==1.0.31

bench: $(STAMP)
	$(PY) -m pip install -q --no-deps $(PEERS) || echo "peers not installed: timing without them"
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
