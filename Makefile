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
# The extension (maturin develop --release) and `cargo test --release` share one target directory and one
# profile, so the tests reuse the extension's compiled dependencies; only pyo3's own crates (the extension-module
# feature) and this crate's test harness are compiled again. The `release` profile has no LTO for this reason
# (Cargo.toml); wheels and `make bench` use the thin-LTO `dist` profile. CARGO_TEST_PROFILE= for a debug build.
export CARGO_TARGET_DIR ?= $(CURDIR)/target
CARGO_TEST_PROFILE ?= --release
# install-%: pip installs the requirements of the named extras (scripts/extra_requirements.py expands
# leukedge[...] references), then maturin develop builds the Rust core, printing cargo's own progress
# ("Compiling image v0.25.x ..."), and installs leukedge in editable mode. Run again with nothing changed,
# cargo compiles nothing.
define INSTALL
	$(PY) scripts/extra_requirements.py $(1) > $(VENV)/requirements-$(subst $(space),-,$(1)).txt
	$(PY) -m pip install --progress-bar on -r $(VENV)/requirements-$(subst $(space),-,$(1)).txt
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --release
endef
space := $(subst ,, )

.PHONY: venv setup setup-demo setup-train demo demo-train test test-rust test-python test-portable build-aarch64 lint bench clean-venv

venv: $(PY)
$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "maturin>=1.5,<2"

setup-demo: $(PY)
	$(call INSTALL,demo)

setup-train: $(PY)
	$(call INSTALL,demo train)

setup: $(PY)
	$(call INSTALL,dev)

demo: setup-demo
	$(VENV)/bin/leukedge demo

demo-train: setup-train
	$(VENV)/bin/leukedge demo --train

test: setup test-rust test-python

test-rust:
	cargo test $(CARGO_TEST_PROFILE) --manifest-path rust_ext/Cargo.toml --no-default-features

test-python:
	$(PY) -m pytest -q -rs

# The portable paths (what a Jetson's Arm cores run) forced on x86 (LEUKEDGE_PORTABLE=1, read once by the Rust core):
# every Rust test, and the bit-identical sample-cell tests of the Rust core, run on them.
PORTABLE_PYTESTS = tests/test_portable.py tests/test_native_pipeline.py tests/test_native_batch.py \
	tests/test_native_stain.py tests/test_native_resize.py tests/test_native_decode.py
test-portable:
	LEUKEDGE_PORTABLE=1 cargo test $(CARGO_TEST_PROFILE) --manifest-path rust_ext/Cargo.toml --no-default-features
	LEUKEDGE_PORTABLE=1 $(PY) -m pytest -q -rs $(PORTABLE_PYTESTS)

# The crate for a Jetson's cores (aarch64-unknown-linux-gnu), with the Debian cross toolchain
# (apt-get install gcc-aarch64-linux-gnu; rustup target add aarch64-unknown-linux-gnu). Builds, does not run.
# The extension-module feature, as maturin builds it: the module links no libpython (there is no aarch64
# libpython here); warnings are errors, since code behind `cfg(target_arch)` is only compiled on that target.
build-aarch64:
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
	RUSTFLAGS="-D warnings" cargo build --manifest-path rust_ext/Cargo.toml --no-default-features \
		--features pyo3/extension-module --target aarch64-unknown-linux-gnu

lint:
	$(PY) -m ruff check .
	$(PY) -m mypy

# Benchmarks measure what a wheel ships: the extension rebuilt with the thin-LTO `dist` profile.
bench: setup
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --profile dist
	$(PY) benchmarks/bench_preprocess.py

clean-venv:
	rm -rf $(VENV)
