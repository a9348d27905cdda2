"""leukedge: fast single-cell leukemia (C-NMC 2019) classification from microscope to TensorRT.

The Python API follows the pipeline; every name is imported on first use (PEP 562), so
``import leukedge`` stays fast and loads neither PyTorch nor ONNX Runtime:

* ``run_preprocess(sources, out_dir, config)`` - decode, stain-normalise and resize images into a
  dataset cache (Rust core); ``load_cache(path)`` opens one.
* ``train(cache, out_dir, TrainConfig(...))`` - train a classifier with subject-disjoint validation;
  ``cross_validate(cache, out_dir, config, folds=3)`` - subject-grouped K-fold CV.
* ``evaluate(cache, bundle)`` - weighted F1, ROC-AUC and a per-subject breakdown.
* ``load_bundle(path)`` - a trained model bundle (PyTorch); ``export_bundle(bundle, out_dir)`` - ONNX
  FP32/FP16; ``build_engine(onnx, engine)`` - TensorRT / TensorRT-RTX FP16 engine.
* ``Predictor(model)`` - classify image files or arrays with the fastest usable backend
  (``with Predictor() as p: p.predict(paths)``; default: the shipped model).
* ``PreprocessConfig`` / ``StainConfig`` - the preprocessing settings that travel with a model.

Example::

    import leukedge
    leukedge.run_preprocess(["cells/"], "cache", leukedge.PreprocessConfig(size=224))
    result = leukedge.train("cache", "run", leukedge.TrainConfig(arch="tiny", epochs=5))
    with leukedge.Predictor(result.bundle_path) as predictor:
        for r in predictor.predict(["cell.bmp"]):
            print(r.path, r.label, r.probability)

The command line (``leukedge --help``) is :mod:`leukedge.cli`; docs/architecture.md maps the modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "PreprocessConfig": "leukedge.config",
    "StainConfig": "leukedge.config",
    "ConfigMismatchError": "leukedge.config",
    "run_preprocess": "leukedge.preprocess",
    "load_cache": "leukedge.artifacts",
    "Cache": "leukedge.artifacts",
    "TrainConfig": "leukedge.training",
    "train": "leukedge.training",
    "cross_validate": "leukedge.cv",
    "evaluate": "leukedge.evaluate",
    "load_bundle": "leukedge.models",
    "export_bundle": "leukedge.export",
    "build_engine": "leukedge.engines.build",
    "Predictor": "leukedge.infer",
    "run_inference": "leukedge.infer",
    "get_backend": "leukedge.engines",
}

__all__ = [
    "Cache",
    "ConfigMismatchError",
    "Predictor",
    "PreprocessConfig",
    "StainConfig",
    "TrainConfig",
    "__version__",
    "build_engine",
    "cross_validate",
    "evaluate",
    "export_bundle",
    "get_backend",
    "load_bundle",
    "load_cache",
    "run_inference",
    "run_preprocess",
    "train",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from .artifacts import Cache, load_cache
    from .config import ConfigMismatchError, PreprocessConfig, StainConfig
    from .cv import cross_validate
    from .engines import get_backend
    from .engines.build import build_engine
    from .evaluate import evaluate
    from .export import export_bundle
    from .infer import Predictor, run_inference
    from .models import load_bundle
    from .preprocess import run_preprocess
    from .training import TrainConfig, train


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'leukedge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
