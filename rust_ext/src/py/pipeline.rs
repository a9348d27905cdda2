//! `leukedge._native.Pipeline`: a preprocessing configuration parsed and validated once, with its
//! stain parameters resolved and its output tables built once, reused for every batch.
//!
//! A thin wrapper around [`crate::batch::Pipeline`]; the pixel work is in the pure-Rust modules.
//! [`run_items`] is the batch run shared with `preprocess_batch`.

use std::sync::Arc;

use half::f16;
use numpy::ndarray::IxDyn;
use numpy::{Element, PyArrayDyn, PyArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString};

use super::convert::{batch_items, check_out, status_list, type_name, HeldItem};
use super::to_py;
use crate::batch::{ItemStatus, Pipeline, Source};
use crate::config::{DType, Layout, StainMethod};
use crate::output::OutElem;

/// Run a validated pipeline over `items` (paths, encoded bytes or uint8 arrays): the shared body of
/// `Pipeline.run` and `preprocess_batch`.
pub fn run_items<'py>(
    py: Python<'py>,
    pipeline: &Pipeline,
    items: &Bound<'py, PyAny>,
    out: Option<&Bound<'py, PyAny>>,
    threads: usize,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyList>)> {
    let (held, names) = batch_items(items)?;
    // the one place a dtype picks the output element type
    let (arr, statuses) = match pipeline.cfg.dtype {
        DType::Uint8 => run_typed::<u8>(py, pipeline, &held, &names, out, threads),
        DType::Float32 => run_typed::<f32>(py, pipeline, &held, &names, out, threads),
        DType::Float16 => run_typed::<f16>(py, pipeline, &held, &names, out, threads),
    }?;
    Ok((arr, status_list(py, &statuses, &names)?))
}

/// [`run_items`] for the output element `T`: validates `out` (or makes a zeroed array), then runs
/// the batch with the GIL released.
fn run_typed<'py, T: OutElem + Element>(
    py: Python<'py>,
    pipeline: &Pipeline,
    held: &[HeldItem<'py>],
    names: &[String],
    out: Option<&Bound<'py, PyAny>>,
    threads: usize,
) -> PyResult<(Bound<'py, PyAny>, Vec<ItemStatus>)> {
    let shape = pipeline.cfg.output_shape(held.len());
    let arr = match out {
        Some(o) => check_out::<T>(o, &pipeline.cfg, &shape)?,
        None => PyArrayDyn::<T>::zeros(py, IxDyn(&shape), false),
    };
    let sources: Vec<Source<'_>> = held.iter().map(HeldItem::source).collect();
    let statuses = {
        let mut rw = arr
            .try_readwrite()
            .map_err(|e| PyValueError::new_err(format!("out is not writeable: {e}")))?;
        let buf = rw.as_slice_mut().map_err(|e| PyValueError::new_err(e.to_string()))?;
        py.detach(|| pipeline.run_batch(&sources, names, buf, threads))
    }
    .map_err(to_py)?;
    Ok((arr.into_any(), statuses))
}

/// Pipeline(config) -- `config` is the JSON of `PreprocessConfig.to_native_json()` or any object
/// with a `to_native_json()` method (a `PreprocessConfig`).
#[pyclass(name = "Pipeline", module = "leukedge._native", frozen)]
pub struct PyPipeline {
    inner: Arc<Pipeline>,
    /// The parsed config, serialised again (every field explicit, defaults filled in).
    config_json: String,
}

#[pymethods]
impl PyPipeline {
    #[new]
    fn new(config: &Bound<'_, PyAny>) -> PyResult<Self> {
        let json: String = if let Ok(s) = config.cast::<PyString>() {
            s.to_str()?.to_owned()
        } else if config.hasattr("to_native_json")? {
            config.call_method0("to_native_json")?.extract()?
        } else {
            return Err(PyTypeError::new_err(format!(
                "Pipeline(config): expected the config JSON (str) or a PreprocessConfig, got {}",
                type_name(config)
            )));
        };
        let inner = Pipeline::from_json(&json).map_err(to_py)?;
        let config_json = serde_json::to_string(&inner.cfg).expect("a parsed config serialises");
        Ok(PyPipeline {
            inner: Arc::new(inner),
            config_json,
        })
    }

    /// run(items, out=None, threads=0) -> (ndarray, list[ItemStatus])
    #[pyo3(signature = (items, out = None, threads = 0))]
    fn run<'py>(
        &self,
        py: Python<'py>,
        items: &Bound<'py, PyAny>,
        out: Option<&Bound<'py, PyAny>>,
        threads: usize,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyList>)> {
        run_items(py, &self.inner, items, out, threads)
    }

    /// Output shape of a batch of `n` items: `(n, 3, S, S)` (nchw) or `(n, S, S, 3)` (nhwc).
    fn output_shape(&self, n: usize) -> (usize, usize, usize, usize) {
        let [a, b, c, d] = self.inner.cfg.output_shape(n);
        (a, b, c, d)
    }

    /// The validated configuration as JSON (every field explicit).
    #[getter]
    fn config(&self) -> &str {
        &self.config_json
    }

    /// Output side length in pixels.
    #[getter]
    fn size(&self) -> u32 {
        self.inner.cfg.size
    }

    /// Output dtype name: "float32", "float16" or "uint8".
    #[getter]
    fn dtype(&self) -> &'static str {
        self.inner.cfg.dtype.name()
    }

    /// Output layout: "nchw" or "nhwc".
    #[getter]
    fn layout(&self) -> &'static str {
        match self.inner.cfg.layout {
            Layout::Nchw => "nchw",
            Layout::Nhwc => "nhwc",
        }
    }

    /// Stain method: "macenko", "reinhard" or "none".
    #[getter]
    fn stain_method(&self) -> &'static str {
        match self.inner.cfg.stain.method {
            StainMethod::Macenko => "macenko",
            StainMethod::Reinhard => "reinhard",
            StainMethod::None => "none",
        }
    }

    fn __repr__(&self) -> String {
        format!("Pipeline({})", self.config_json)
    }
}
