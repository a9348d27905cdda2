"""One typed reader / writer per file leukedge leaves on disk, and the only home of its names, defaults,
bounds and error class. No other module parses these files (tests/test_layout.py checks it):

* :mod:`.cache`: the dataset cache of ``leukedge preprocess`` (``cache.json``, ``config.json``, ``manifest.csv``,
  ``images.npy``): :func:`~.cache.load_cache`, :class:`~.cache.Cache`, the manifest;
* :mod:`.bundle`: a model bundle (``bundle.json``, ``model.safetensors``, ``trained_on.txt``):
  :func:`~.bundle.read_bundle` -> :class:`~.bundle.BundleFile`, :class:`~.bundle.BundleError`;
* :mod:`.export`: an ONNX export folder (``preprocess.json``, ``export.json``, ``model_*.onnx`` metadata);
* :mod:`.sidecar`: an engine's sidecar ``ENGINE.json``, :class:`~.sidecar.EngineMismatchError`.

The preprocessing config itself (``config.json`` / ``preprocess.json``) is :class:`leukedge.config.PreprocessConfig`
(``load`` / ``save``). Nothing here imports torch, onnxruntime or TensorRT (``onnx`` only inside
:func:`~.export.onnx_config`). Above this layer, :func:`leukedge.model.open_model` opens a whole model once.
"""
