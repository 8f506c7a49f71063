# The two commands of the README. Everything is installed into .venv/ from the package registries.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REF_VENV := .venv-ref
REF_STAMP := $(REF_VENV)/.installed

.PHONY: demo test test-all bench bench-train bench-live bench-physmamba bench-model ref-venv fixtures gpu-kit clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# The published weights and the BlazeFace model ship as data files of this wheel; its code and its
	# dependencies (keras, onnxruntime, GUI OpenCV) are never imported, so they are not installed.
	$(PY) -m pip install --quiet --no-deps open-rppg==0.1.1
	$(PY) -m model.weights --check
	touch $@

demo: $(STAMP)
	$(VENV)/bin/pulsepipe demo

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ''

# The published implementation with its own dependencies, for the parity fixtures and the benchmarks only.
$(REF_STAMP): Makefile
	$(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(REF_VENV)/bin/python -m pip install --quiet open-rppg==0.1.1 jax==0.10.2 opencv-python-headless h5py
	touch $@

ref-venv: $(REF_STAMP)

fixtures: $(STAMP) $(REF_STAMP)
	$(REF_VENV)/bin/python tests/fixtures/make_me_parity.py tests/fixtures/me_parity.npz
	$(REF_VENV)/bin/python tests/fixtures/make_crop_parity.py tests/fixtures/crop_parity.npz
	$(REF_VENV)/bin/python tests/fixtures/make_physmamba_parity.py tests/fixtures/physmamba_parity.npz

bench: $(STAMP) $(REF_STAMP)
	$(PY) bench/bench_model.py --ref-python $(REF_VENV)/bin/python
	$(PY) bench/bench_video.py --ref-python $(REF_VENV)/bin/python

# Training: our train_step against Keras's train_on_batch on the same architecture, T = 160, 640, 1600 frames.
bench-train: $(STAMP) $(REF_STAMP)
	$(PY) bench/bench_train.py --ref-python $(REF_VENV)/bin/python

# Live: per-frame latency (paced), frames/s (unpaced), RSS after 1 and 10 min, beside open-rppg's real-time path.
bench-live: $(STAMP) $(REF_STAMP)
	$(PY) bench/bench_live.py --ref-python $(REF_VENV)/bin/python

# PhysMamba: whole-video frames/s and peak memory (1 and 10 min) against a few chunks of the Keras model.
bench-physmamba: $(STAMP) $(REF_STAMP)
	$(PY) bench/bench_physmamba.py --ref-python $(REF_VENV)/bin/python

# What bench/gpu_check.sh needs on a lent GPU machine that has no network: the published weights.
gpu-kit: $(STAMP)
	mkdir -p .gpu-kit/weights
	dir=$$($(PY) -c 'from transforms.published_files import weights_dir; print(weights_dir())') && \
	  cp "$$dir/ME.rlap.weights.h5" "$$dir/ME.pure.weights.h5" "$$dir/state.pkl" \
	    "$$dir/PhysMamba.rlap.weights.h5" "$$dir/PhysMamba.pure.weights.h5" .gpu-kit/weights/

clean:
	rm -rf $(VENV) $(REF_VENV) *.egg-info
