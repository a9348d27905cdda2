//! Small numeric kernels shared by the stain methods.

pub mod linalg;
pub mod select;
