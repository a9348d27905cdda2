//! The Python side of the core: thin wrappers that convert arguments while holding the GIL,
//! release it (`Python::detach`) for all pixel work, and map [`Error`] to Python exceptions.
//!
//! * [`convert`]: argument and result conversion (image arrays, batch items, `out`, statuses);
//! * [`functions`]: the module's `#[pyfunction]`s;
//! * [`pipeline`]: the `Pipeline` class and the batch run shared with `preprocess_batch`.

pub mod convert;
pub mod functions;
pub mod pipeline;

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::PyErr;

use crate::error::Error;

create_exception!(
    leukedge._native,
    DecodeError,
    PyValueError,
    "An image could not be decoded (zero-byte, truncated, not an image, too large, unsupported). The message names the file."
);
create_exception!(
    leukedge._native,
    StainError,
    PyValueError,
    "Stain parameters could not be fitted."
);
create_exception!(
    leukedge._native,
    ConfigError,
    PyValueError,
    "The preprocessing configuration is invalid."
);

/// The Python exception of a core error.
pub fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Decode { .. } => DecodeError::new_err(msg),
        Error::Stain(_) => StainError::new_err(msg),
        Error::Config(_) => ConfigError::new_err(msg),
        Error::Input(_) => PyValueError::new_err(msg),
    }
}
