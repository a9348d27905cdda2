# leukedge: the commands a newcomer needs. Each makes (once) and uses its own virtual environment, $(VENV).
#   make demo        - the Rust core + leukedge[demo] (ONNX Runtime, scikit-learn, matplotlib; NO PyTorch) + the
#                      shipped model, then `leukedge demo`: preprocess -> infer -> station -> report on real + synthetic cells
#   make demo-train  - adds PyTorch (leukedge[train]; PyPI's torch wheel is the CUDA build, about 4 GB with its
#                      nvidia-* wheels) and runs `leukedge demo --train` (a tiny model trained on synthetic cells)
#   make test        - the development install (leukedge[dev]) and every test: cargo test + pytest
#   make lint        - ruff (with its complexity limit) and mypy on the public API, as configured in pyproject.toml
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The extension (maturin) and `cargo test` share one target directory and one profile (release), so the crates
# they have in common (image, rayon, fast_image_resize, serde ...) compile once; only the crate itself and pyo3
# (without its extension-module feature) are compiled again for the tests.
export CARGO_TARGET_DIR ?= $(CURDIR)/target
CARGO_TEST_PROFILE ?= --release
# maturin develop: cargo prints its own progress ("Compiling image v0.25.x ...") while it builds the Rust core,
# then the package is installed in editable mode with the named extras; run again with nothing changed, it
# recompiles nothing.
MATURIN_DEVELOP = VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --release

.PHONY: venv setup setup-demo setup-train demo demo-train test test-rust test-python lint bench clean-venv

venv: $(PY)
$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "maturin>=1.5,<2"

setup-demo: $(PY)
	$(MATURIN_DEVELOP) --extras demo

setup-train: $(PY)
	$(MATURIN_DEVELOP) --extras demo,train

setup: $(PY)
	$(MATURIN_DEVELOP) --extras dev

demo: setup-demo
	$(VENV)/bin/leukedge demo

demo-train: setup-train
	$(VENV)/bin/leukedge demo --train

test: setup test-rust test-python

test-rust:
	cargo test $(CARGO_TEST_PROFILE) --manifest-path rust_ext/Cargo.toml --no-default-features

test-python:
	$(PY) -m pytest -q -rs

lint:
	$(PY) -m ruff check .
	$(PY) -m mypy

bench: setup
	$(PY) benchmarks/bench_preprocess.py

clean-venv:
	rm -rf $(VENV)
