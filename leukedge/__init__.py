"""leukedge: fast single-cell leukemia (C-NMC 2019) classification from microscope to TensorRT."""

__version__ = "0.1.0"

from .config import PreprocessConfig, StainConfig  # noqa: E402

__all__ = ["PreprocessConfig", "StainConfig", "__version__"]
