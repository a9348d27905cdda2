# leukedge: the two commands a newcomer needs.
#   make demo   - install everything and run the whole pipeline end to end on synthetic cells
#   make test   - install everything and run all tests (cargo + pytest)
#   make lint   - ruff (with its complexity limit) and mypy on the public API, as configured in pyproject.toml
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: setup demo test test-rust test-python lint bench

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

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy

bench: setup
	$(PYTHON) benchmarks/bench_preprocess.py
