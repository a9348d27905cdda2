# leukedge: the two commands a newcomer needs.
#   make demo   - install everything and run the whole pipeline end to end on synthetic cells
#   make test   - install everything and run all tests (cargo + pytest)
#   make lint   - ruff (with its complexity limit) and mypy on the public API, as configured in pyproject.toml
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: setup demo test test-rust test-python test-portable build-aarch64 lint bench

setup:
	$(PIP) install --quiet --upgrade pip
	$(PIP) install -e ".[dev]"

demo: setup
	leukedge demo

test: setup test-rust test-python

test-rust:
	cargo test --manifest-path rust_ext/Cargo.toml --no-default-features

test-python:
	$(PYTHON) -m pytest -q -rs

# The portable paths (what a Jetson's Arm cores run) forced on x86 (LEUKEDGE_PORTABLE=1, read once by the Rust core):
# every Rust test, and the bit-identical sample-cell tests of the Rust core, run on them.
PORTABLE_PYTESTS = tests/test_portable.py tests/test_native_pipeline.py tests/test_native_batch.py \
	tests/test_native_stain.py tests/test_native_resize.py tests/test_native_decode.py
test-portable:
	LEUKEDGE_PORTABLE=1 cargo test --manifest-path rust_ext/Cargo.toml --no-default-features
	LEUKEDGE_PORTABLE=1 $(PYTHON) -m pytest -q -rs $(PORTABLE_PYTESTS)

# The crate for a Jetson's cores (aarch64-unknown-linux-gnu), with the Debian cross toolchain
# (apt-get install gcc-aarch64-linux-gnu; rustup target add aarch64-unknown-linux-gnu). Builds, does not run.
build-aarch64:
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
		cargo build --manifest-path rust_ext/Cargo.toml --no-default-features --target aarch64-unknown-linux-gnu

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy

bench: setup
	$(PYTHON) benchmarks/bench_preprocess.py
