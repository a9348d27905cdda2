//! `leukedge._native`: the Rust core of leukedge.
//!
//! Pure-Rust modules (each with `cargo test`s, no Python needed):
//! [`decode`], [`stain`] (mask, params, macenko, reinhard, lab), [`numeric`] (select, linalg),
//! [`resize`], [`jpeg_scan`], [`batch`], [`output`], [`gate`], [`config`], [`error`], [`cpu`]. The Python layer is
//! [`py`]: thin wrappers that convert arguments while holding the GIL, release it
//! (`Python::detach`) for all pixel work, and map [`error::Error`] to Python exceptions. No panic
//! crosses into Python: batch items run under `catch_unwind`, and PyO3 turns any other panic into
//! a `PanicException`. This file only registers the module.

// Numerical kernels index small fixed-size matrices explicitly, and `!(x > 0.0)` is used on
// purpose to treat NaN as failure.
#![allow(clippy::needless_range_loop, clippy::neg_cmp_op_on_partial_ord)]

pub mod batch;
pub mod config;
pub mod cpu;
pub mod decode;
pub mod error;
pub mod gate;
pub mod jpeg_scan;
pub mod numeric;
pub mod output;
pub mod resize;
pub mod stain;

mod py;

/// mimalloc (as pydantic-core uses): every image is a fresh ~600 KB buffer, which glibc's malloc
/// serves with mmap/munmap and page faults per item; that cost serialised the worker threads
/// (1.3x on 2 cores with glibc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use pyo3::prelude::*;

use crate::decode::DEFAULT_MAX_PIXELS;
use crate::py::functions;

#[pymodule]
#[pyo3(name = "_native")]
fn native_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("DecodeError", py.get_type::<py::DecodeError>())?;
    m.add("StainError", py.get_type::<py::StainError>())?;
    m.add("ConfigError", py.get_type::<py::ConfigError>())?;
    m.add("DEFAULT_MAX_PIXELS", DEFAULT_MAX_PIXELS)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(functions::py_decode, m)?)?;
    m.add_function(wrap_pyfunction!(functions::fit_stain, m)?)?;
    m.add_function(wrap_pyfunction!(functions::normalize_stain, m)?)?;
    m.add_function(wrap_pyfunction!(functions::reference_params, m)?)?;
    m.add_function(wrap_pyfunction!(functions::py_resize, m)?)?;
    m.add_function(wrap_pyfunction!(functions::foreground_mask, m)?)?;
    m.add_function(wrap_pyfunction!(functions::foreground_bbox, m)?)?;
    m.add_function(wrap_pyfunction!(functions::preprocess_batch, m)?)?;
    m.add_class::<py::pipeline::PyPipeline>()?;
    m.add_function(wrap_pyfunction!(functions::default_threads, m)?)?;
    m.add_function(wrap_pyfunction!(functions::py_max_file_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(functions::cpu_paths, m)?)?;
    Ok(())
}
