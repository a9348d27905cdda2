"""The GPU path on a CPU machine: engine selection, fallback and mismatch logic under a faked GPU
(conftest.fake_gpu over leukedge.engines.gpu.OVERRIDES), the TensorRT backend's plumbing over a fake TensorRT + fake CUDA
binding, the CUDA binding selection, and the PyTorch CUDA backend's CPU-testable parts."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tomllib
from click.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from conftest import fake_gpu  # noqa: E402

from leukedge.config import PreprocessConfig  # noqa: E402
from leukedge.engines import BackendUnavailable, EngineMismatchError, get_backend  # noqa: E402
from leukedge.engines import gpu as gpumod  # noqa: E402
from leukedge.engines.gpu import GpuInfo, detect_gpu  # noqa: E402
from leukedge.engines.sidecar import check_compatible, write_sidecar  # noqa: E402

SIZE = 48
REPO = Path(__file__).resolve().parents[1]

RTX4090 = GpuInfo("NVIDIA GeForce RTX 4090", "8.9", driver="12.8", runtime="12.8", memory_mib=24564)
H200 = GpuInfo("NVIDIA H200", "9.0", driver="13.0", runtime="13.0", memory_mib=143771)
ORIN = GpuInfo("Orin (nvgpu)", "8.7", driver="12.6", runtime="12.6", memory_mib=62841)
OLD_DRIVER = GpuInfo("NVIDIA GeForce RTX 3060", "8.6", driver="12.2", runtime="13.0")
FAKES = {"rtx4090": RTX4090, "h200": H200, "orin": ORIN, "old-driver": OLD_DRIVER}


def _rtx_ok() -> bool:
    try:
        import tensorrt_rtx  # noqa: F401

        return True
    except Exception:  # noqa: BLE001
        return False


needs_rtx = pytest.mark.skipif(not _rtx_ok(), reason="tensorrt_rtx not importable")


@pytest.fixture(params=list(FAKES))
def any_gpu(request):
    with fake_gpu(FAKES[request.param]) as probe:
        yield request.param, probe


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from leukedge.export import export_bundle

    sys.path.insert(0, str(Path(__file__).parent))
    from test_export import make_bundle

    d = tmp_path_factory.mktemp("gpufake")
    bundle = make_bundle(d / "bundle", size=SIZE)
    export_bundle(bundle, d / "export", fp16=True, io_dtype="float16", check=False)
    return bundle, d / "export"


@pytest.fixture(scope="module")
def rtx_export(exported):
    """The export with a real TensorRT-RTX engine (built for 8.9) beside it."""
    if not _rtx_ok():
        pytest.skip("tensorrt_rtx not importable")
    from leukedge.engines.build import build_engine

    bundle, exp = exported
    build_engine(exp, exp / "model.plan", backend="tensorrt-rtx", max_batch=16, opt_batch=4, workspace_mib=64,
                 target_cc=("8.9",))
    return bundle, exp


# ---------------------------------------------------------------------------------------- the seam
def test_fake_gpu_seam_and_env(monkeypatch):
    with fake_gpu(H200):
        p = detect_gpu()
        assert p.status == "ok" and p.gpu.name == "NVIDIA H200" and p.gpu["compute_capability"] == "9.0" and p.gpu.fake
        with fake_gpu(None):
            assert detect_gpu().gpu is None and detect_gpu().status == "no-gpu"
    monkeypatch.setenv(gpumod.FAKE_GPU_ENV, '{"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9", '
                                            '"driver": "12.8", "runtime": "12.8"}')
    assert detect_gpu().gpu.compute_capability == "8.9"
    monkeypatch.setenv(gpumod.FAKE_GPU_ENV, "none")
    assert detect_gpu().gpu is None
    monkeypatch.setenv(gpumod.FAKE_GPU_ENV, "{bad")
    with pytest.raises(ValueError, match=gpumod.FAKE_GPU_ENV):
        detect_gpu()


# ------------------------------------------------------------------------- defect 1: --validate
@needs_rtx
def test_validate_on_any_gpu_is_reported_not_a_traceback(rtx_export, any_gpu, tmp_path):
    from leukedge.cli.build_engine import build_engine_cmd

    name, probe = any_gpu
    _, exp = rtx_export
    out = tmp_path / "v.plan"
    r = CliRunner().invoke(build_engine_cmd, [str(exp), "-o", str(out), "--backend", "tensorrt-rtx", "--target-cc", "8.9",
                                              "--max-batch", "8", "--opt-batch", "4", "--validate"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "validation skipped" in r.output and "Traceback" not in r.output
    if name in ("h200", "orin"):
        assert probe.gpu.compute_capability in r.output  # names this GPU's compute capability
    if name == "old-driver":
        assert "too old" in r.output


# ------------------------------------------------------------- defect 2: auto / device=cpu fallback
@needs_rtx
def test_auto_with_cpu_device_never_tries_the_engine(rtx_export, any_gpu, monkeypatch):
    import leukedge.engines.tensorrt_backend as tb

    _, exp = rtx_export

    def boom(*a, **k):
        raise AssertionError("TensorRT tried with device=cpu")

    monkeypatch.setattr(tb, "TensorRTBackend", boom)
    with get_backend("auto", exp, device="cpu") as b:
        assert b.name.startswith("onnxruntime") and "device cpu" in b.reason


@needs_rtx
def test_auto_treats_engine_mismatch_as_not_usable(rtx_export, any_gpu):
    name, probe = any_gpu
    _, exp = rtx_export
    with get_backend("auto", exp) as b:
        assert b.name.startswith("onnxruntime")
        assert "not usable" in b.reason
        if name in ("h200", "orin"):
            assert probe.gpu.compute_capability in b.reason and "--target-cc" in b.reason or "standard TensorRT" in b.reason
        if name == "old-driver":
            assert "too old" in b.reason


# ----------------------------------------------------------------------- defect 3: station --fallback
@needs_rtx
@pytest.mark.parametrize("gpu", [H200, ORIN], ids=["h200", "orin"])
def test_station_fallback_covers_engine_mismatch(rtx_export, gpu):
    import click
    from rich.console import Console

    from leukedge.cli.station import open_predictor

    _, exp = rtx_export
    console = Console(stderr=True, quiet=True)
    with fake_gpu(gpu):
        pred, info = open_predictor(str(exp), "tensorrt-rtx", fallback=True, device="auto", threads=1, batch_size=4,
                                    console=console)
        try:
            assert info.backend.startswith("onnxruntime")
        finally:
            pred.close()
        with pytest.raises(click.ClickException, match="--fallback"):
            open_predictor(str(exp), "tensorrt-rtx", fallback=False, device="auto", threads=1, batch_size=4,
                           console=console)


def test_station_never_falls_back_from_a_preprocessing_mismatch():
    from leukedge.cli.station import _is_config_mismatch
    from leukedge.config import ConfigMismatchError

    assert _is_config_mismatch(ConfigMismatchError("crop_margin differs"))
    assert not _is_config_mismatch(EngineMismatchError("built with tensorrt 8.5.2 but 10.3.0 is installed"))


# -------------------------------------------------------------- defect 4: build-engine --backend auto
@pytest.mark.parametrize("gpu", [H200, ORIN], ids=["h200", "orin"])
def test_auto_flavour_refuses_a_gpu_tensorrt_rtx_cannot_target(gpu, monkeypatch):
    import leukedge.engines.build as build

    real = build.import_trt

    def no_standard(flavour):
        if flavour == "tensorrt":
            raise BackendUnavailable("tensorrt is not usable (No module named 'tensorrt'); pip install tensorrt")
        return real(flavour)

    monkeypatch.setattr(build, "import_trt", no_standard)
    with fake_gpu(gpu):
        with pytest.raises(build.BuildError) as ei:
            build.pick_flavour("auto")
    msg = str(ei.value)
    assert gpu.name in msg and gpu.compute_capability in msg and "standard TensorRT" in msg and "--backend torch" in msg


@needs_rtx
@pytest.mark.parametrize("gpu", [RTX4090, OLD_DRIVER, None], ids=["rtx4090", "old-driver", "no-gpu"])
def test_auto_flavour_picks_rtx_where_it_can_run_or_build_ahead(gpu, monkeypatch):
    import leukedge.engines.build as build

    real = build.import_trt
    monkeypatch.setattr(build, "import_trt", lambda f: (_ for _ in ()).throw(BackendUnavailable("no tensorrt"))
                        if f == "tensorrt" else real(f))
    with fake_gpu(gpu):
        flavour, why = build.pick_flavour("auto")
    assert flavour == "tensorrt-rtx"
    if gpu is OLD_DRIVER:
        assert "too old" in why


# ------------------------------------------------------------------ defect 5: cuda-python pin, old driver
def test_cuda_python_pinned_to_the_tensorrt_wheels_cuda_major():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = meta["project"]["optional-dependencies"]["trt-rtx"]
    trt = next(d for d in deps if d.startswith("tensorrt-rtx"))
    cp = next(d for d in deps if d.startswith("cuda-python"))
    assert trt.startswith("tensorrt-rtx-cu12") and cp.replace(" ", "") == "cuda-python>=12,<13"


class _FakeCudart:
    """Just what detection calls, answering like cuda-python 13 on a CUDA 12.2 driver."""

    class cudaError_t:  # noqa: N801
        cudaSuccess = SimpleNamespace(name="cudaSuccess")
        cudaErrorInsufficientDriver = SimpleNamespace(name="cudaErrorInsufficientDriver")

    def __init__(self, driver: int) -> None:
        self.driver = driver

    def cudaDriverGetVersion(self):  # noqa: N802
        return self.cudaError_t.cudaSuccess, self.driver

    def cudaRuntimeGetVersion(self):  # noqa: N802
        return self.cudaError_t.cudaSuccess, 13000

    def cudaGetDeviceCount(self):  # noqa: N802
        return self.cudaError_t.cudaErrorInsufficientDriver, None


def test_driver_too_old_is_said_not_no_gpu():
    p = gpumod._detect_cudart(_FakeCudart(12020), 0)
    assert p.gpu is None and p.status == "driver-too-old"
    assert "too old" in p.reason and "12.2" in p.reason and "13.0" in p.reason and "cuda-python>=12,<13" in p.reason
    assert gpumod._detect_cudart(_FakeCudart(0), 0).status == "no-driver"  # no libcuda at all: not "too old"
    with fake_gpu(OLD_DRIVER):
        from leukedge.engines.tensorrt_backend import gpu_info, no_gpu_reason

        assert gpu_info() is None and "too old" in no_gpu_reason()


def test_driver_too_old_reaches_the_auto_reason(exported):
    bundle, exp = exported
    with fake_gpu(OLD_DRIVER):
        with get_backend("auto", bundle) as b:
            assert "too old" in b.reason and b.on_cpu


# --------------------------------------------------------- defect 7: RTX targets and readable validity
def _sidecar(tmp_path: Path, **over) -> tuple[dict, Path]:
    cfg = PreprocessConfig(size=SIZE)
    info = {"flavour": "tensorrt-rtx", "trt_version": "1.7.1.116", "target_compute_capabilities": [],
            "built_on": {"gpu": None, "compute_capability": None}, "hardware_compat": None, "precision": "fp16",
            "inputs": [{"name": "input", "dtype": "float16", "shape": [-1, 3, SIZE, SIZE]}],
            "outputs": [{"name": "logits", "dtype": "float16", "shape": [-1, 2]}],
            "profile": {"input": "input", "min": 1, "opt": 4, "max": 16, "chw": [3, SIZE, SIZE]},
            "onnx": {"path": str(tmp_path / "gone.onnx"), "source": "/exports/tiny"},
            "preprocess": cfg.to_dict(), "preprocess_hash": cfg.pixel_hash()}
    info.update(over)
    eng = tmp_path / "fake.plan"
    eng.write_bytes(b"not an engine")
    write_sidecar(eng, info)
    return info, eng


def test_rtx_default_targets_defer_to_the_runtime(tmp_path):
    info, eng = _sidecar(tmp_path)
    for cc in ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1"):  # TensorRT-RTX's own check decides on these
        check_compatible(info, eng, flavour="tensorrt-rtx", trt_version="1.7.1.116", compute_capability=cc)
    for cc in ("9.0", "8.7", "13.0", "10.0"):  # not a TensorRT-RTX target at all (">= 12.1" no longer passes)
        with pytest.raises(EngineMismatchError, match=rf"does not target compute capability {cc}"):
            check_compatible(info, eng, flavour="tensorrt-rtx", trt_version="1.7.1.116", compute_capability=cc)


@needs_rtx
def test_engine_validity_diagnostics_in_words():
    import tensorrt_rtx as trt

    from leukedge.engines.tensorrt_backend import describe_validity

    d = trt.EngineInvalidityDiagnostics
    text = describe_validity(trt, int(d.UNSUPPORTED_CC) | int(d.OLD_CUDA_DRIVER))
    assert "UNSUPPORTED_CC" in text and "compute capability" in text and "driver is too old" in text
    assert describe_validity(trt, 0) != "0" and "no diagnostic" in describe_validity(trt, 0)


@needs_rtx
def test_invalid_engine_message_is_readable(rtx_export):
    # the real TensorRT-RTX runtime on this GPU-less machine calls the engine INVALID with diagnostics 0
    _, exp = rtx_export
    with fake_gpu(RTX4090), pytest.raises(EngineMismatchError) as ei:
        get_backend("tensorrt-rtx", exp)
    assert "invalid on NVIDIA GeForce RTX 4090" in str(ei.value) and ": 0." not in str(ei.value)


# ------------------------------------------------------------------------ defect 8: timing cache
class _FakeBuilderConfig:
    def __init__(self, accept: list[bool]) -> None:
        self.accept, self.created = list(accept), []

    def create_timing_cache(self, blob):
        self.created.append(bytes(blob))
        return object()

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False
        return self.accept.pop(0)


def test_rejected_timing_cache_is_not_reported_as_loaded(tmp_path):
    from leukedge.engines.build import apply_timing_cache

    tc = tmp_path / "tc.bin"
    tc.write_bytes(b"x" * 100)
    notes: list[str] = []
    used = apply_timing_cache(_FakeBuilderConfig([False, True]), tc, notes)
    assert used["rejected"] is True and used["loaded_bytes"] == 0 and used["rejected_bytes"] == 100
    assert notes and "rejected" in notes[0]
    used = apply_timing_cache(_FakeBuilderConfig([True]), tc, notes := [])
    assert used == {"path": str(tc), "loaded_bytes": 100, "rejected": False} and not notes


# ------------------------------------------- the TensorRT backend over a fake TensorRT and fake CUDA binding
class FakeBinding:
    """CudaBinding over host memory: 'device' buffers are bytearrays; counts what is live."""

    name = "fake-cuda"

    def __init__(self, fail_malloc_at: int | None = None) -> None:
        from leukedge.engines.cuda_binding import PinnedBuffer

        self._Pinned = PinnedBuffer
        self.dev: dict[int, bytearray] = {}
        self.host: dict[int, np.ndarray] = {}
        self.streams = self.events = 0
        self.mallocs = 0
        self.fail_malloc_at = fail_malloc_at
        self._next = 1 << 20

    import contextlib

    @contextlib.contextmanager
    def activate(self):
        yield

    def host_alloc(self, nbytes):
        arr = np.zeros(nbytes, np.uint8)
        self.host[arr.ctypes.data] = arr
        return self._Pinned(arr.ctypes.data, nbytes, arr)

    def free_host(self, buf):
        buf.array = None
        del self.host[buf.ptr]

    def malloc(self, nbytes):
        self.mallocs += 1
        if self.mallocs == self.fail_malloc_at:
            raise RuntimeError("CUDA cudaMalloc failed: cudaErrorMemoryAllocation: out of memory")
        self._next += nbytes + 256
        self.dev[self._next] = bytearray(nbytes)
        return self._next

    def free(self, ptr):
        del self.dev[ptr]

    def stream_create(self):
        self.streams += 1
        return "stream"

    def stream_handle(self, s):
        return 7

    def stream_sync(self, s):
        pass

    def stream_destroy(self, s):
        self.streams -= 1

    def event_create(self):
        self.events += 1
        return object()

    def event_record(self, e, s):
        pass

    def elapsed_ms(self, a, b):
        return 0.25

    def event_destroy(self, e):
        self.events -= 1

    def htod_async(self, dst, src, stream):
        self.dev[dst][: src.nbytes] = src.tobytes()

    def dtoh_async(self, dst, src, stream):
        dst.reshape(-1).view(np.uint8)[:] = np.frombuffer(bytes(self.dev[src][: dst.nbytes]), np.uint8)

    def close(self):
        pass

    def live(self):
        return len(self.dev) + len(self.host) + self.streams + self.events


def make_fake_trt(binding: FakeBinding, version: str = "1.7.1.116"):
    """A TensorRT-RTX stand-in whose 'engine' computes logits [mean(x), -mean(x)] per image."""
    f16, f32 = "f16", "f32"
    saved: dict[str, bytes] = {}

    class Cache:
        def __init__(self):
            self.blob = b""

        def deserialize(self, blob):
            self.blob = bytes(blob)
            return blob.startswith(b"RTC")

        def reset(self):
            self.blob = b""

        def serialize(self):
            return b"RTC" + self.blob[3:] + b"k"

    class RuntimeConfig:
        dynamic_shapes_kernel_specialization_strategy = None

        def create_runtime_cache(self):
            return Cache()

        def set_runtime_cache(self, c):
            saved["cache"] = c
            return True

    class Context:
        def __init__(self):
            self.addr, self.shapes = {}, []

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def set_input_shape(self, name, shape):
            self.shapes.append(tuple(shape))
            self.shape = shape
            return 1 <= shape[0] <= 16

        def execute_async_v3(self, stream):
            n = self.shape[0]
            x = np.frombuffer(bytes(binding.dev[self.addr["input"]][: n * 3 * SIZE * SIZE * 2]), np.float16)
            m = x.reshape(n, -1).astype(np.float32).mean(1)
            y = np.stack([m, -m], 1).astype(np.float16)
            binding.dev[self.addr["logits"]][: y.nbytes] = y.tobytes()
            return True

    class Engine:
        num_io_tensors = 2

        def __init__(self):
            self.contexts = []

        def get_tensor_name(self, i):
            return ["input", "logits"][i]

        def get_tensor_mode(self, name):
            return "IN" if name == "input" else "OUT"

        def get_tensor_dtype(self, name):
            return f16

        def get_tensor_profile_shape(self, name, p):
            return [(1, 3, SIZE, SIZE), (4, 3, SIZE, SIZE), (16, 3, SIZE, SIZE)]

        def get_tensor_shape(self, name):
            return (-1, 2)

        def create_runtime_config(self):
            return RuntimeConfig()

        def create_execution_context(self, cfg=None):
            c = Context()
            self.contexts.append(c)
            return c

    class Runtime:
        def __init__(self, logger):
            pass

        def get_engine_validity(self, blob):
            return SimpleNamespace(name="VALID"), 0

        def deserialize_cuda_engine(self, blob):
            saved["engine"] = Engine()
            return saved["engine"]

    class Logger:
        WARNING = 1

        def __init__(self, level=1):
            pass

    return SimpleNamespace(
        __version__=version, float16=f16, float32=f32, int32="i32", int8="i8", Logger=Logger, Runtime=Runtime,
        TensorIOMode=SimpleNamespace(INPUT="IN"),
        DynamicShapesKernelSpecializationStrategy=SimpleNamespace(EAGER="EAGER"), saved=saved,
    )


@pytest.fixture
def fake_trt(monkeypatch, tmp_path):
    import leukedge.engines.cuda_binding as cb
    import leukedge.engines.tensorrt_backend as tb

    state = SimpleNamespace(binding=FakeBinding())
    trt = make_fake_trt(state.binding)
    monkeypatch.setattr(tb, "import_trt", lambda f: trt)
    monkeypatch.setattr(cb, "get_binding", lambda name="auto", device=0: state.binding)
    _, eng = _sidecar(tmp_path)
    state.trt, state.engine = trt, eng
    with fake_gpu(RTX4090):
        yield state


def test_tensorrt_backend_plumbing_padding_and_runtime_cache(fake_trt):
    from leukedge.engines.tensorrt_backend import TensorRTBackend, runtime_cache_path

    rc = runtime_cache_path(fake_trt.engine)
    rc.write_bytes(b"RTCold")
    b = TensorRTBackend(fake_trt.engine)
    assert b.name == "tensorrt-rtx-fp16" and b.max_batch == 16 and b._rt_cache.loaded_bytes == 6
    rng = np.random.default_rng(0)
    for n in (3, 5, 7, 16, 1):
        x = rng.standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)
        y, t = b.infer_timed(x)
        m = x.reshape(n, -1).astype(np.float16).astype(np.float32).mean(1)
        np.testing.assert_allclose(y[:, 0], m, atol=2e-3)
        assert y.shape == (n, 2) and t.compute_ms == 0.25
    ctx = fake_trt.trt.saved["engine"].contexts[0]
    assert [s[0] for s in ctx.shapes] == [4, 8, 8, 16, 1]  # a few fixed sizes, not one per batch
    b.close()
    assert rc.read_bytes() == b"RTColdk"  # the runtime cache was saved back beside the engine
    assert fake_trt.binding.live() == 0


def test_rejected_runtime_cache_starts_empty(fake_trt):
    from leukedge.engines.tensorrt_backend import TensorRTBackend, runtime_cache_path

    runtime_cache_path(fake_trt.engine).write_bytes(b"garbage")
    b = TensorRTBackend(fake_trt.engine)
    assert b._rt_cache.loaded_bytes == 0 and "not usable" in b.runtime_cache_note
    b.close()


def test_failed_init_frees_everything_and_closed_backend_raises(fake_trt):
    from leukedge.engines.tensorrt_backend import TensorRTBackend

    fake_trt.binding.fail_malloc_at = 2  # the output device buffer
    with pytest.raises(RuntimeError, match="cudaMalloc"):
        TensorRTBackend(fake_trt.engine)
    assert fake_trt.binding.live() == 0  # pinned input/output and the first device buffer were freed
    fake_trt.binding.fail_malloc_at = None
    b = TensorRTBackend(fake_trt.engine)
    x = np.zeros((2, 3, SIZE, SIZE), np.float32)
    b.infer(x)
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.infer(x)
    b.close()  # idempotent
    assert fake_trt.binding.live() == 0


def test_padded_batch_sizes():
    from leukedge.engines.tensorrt_backend import padded_batch

    assert {padded_batch(n, 1, 64, True) for n in range(1, 65)} == {1, 2, 4, 8, 16, 32, 64}
    assert padded_batch(40, 1, 48, True) == 48 and padded_batch(3, 4, 64, False) == 4 and padded_batch(5, 1, 64, False) == 5


# ------------------------------------------------------------------------------ CUDA binding choice
def test_cuda_binding_selection(monkeypatch):
    import leukedge.engines.cuda_binding as cb

    with pytest.raises(ValueError, match="unknown CUDA binding"):
        cb.get_binding("cupy")
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(BackendUnavailable, match="pycuda is not installed.*nvcc"):
        cb.get_binding("pycuda")

    def no_cuda_python(self, device=0):
        raise BackendUnavailable("cuda-python is not installed (pip install 'cuda-python>=12,<13')")

    monkeypatch.setattr(cb.CudaPythonBinding, "__init__", no_cuda_python)
    with pytest.raises(BackendUnavailable, match="no CUDA binding usable: cuda-python .*; pycuda"):
        cb.get_binding("auto")
    made = []
    monkeypatch.setattr(cb.PycudaBinding, "__init__", lambda self, device=0: made.append(device))
    assert isinstance(cb.get_binding("auto", 1), cb.PycudaBinding) and made == [1]


def test_infer_cli_cuda_binding_reaches_the_backend(exported, tmp_path, monkeypatch):
    import leukedge.engines.factory as base
    from leukedge.cli.infer import infer_cmd

    seen = {}
    real = base.get_backend

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **{**k, "cuda_binding": "auto"})

    monkeypatch.setattr("leukedge.infer.predictor.get_backend", spy)
    from leukedge.synth import make_cell, write_bmp

    (tmp_path / "c").mkdir()
    write_bmp(tmp_path / "c" / "a.bmp", make_cell(0, seed=1, size=64))
    r = CliRunner().invoke(infer_cmd, [str(tmp_path / "c"), "--model", str(exported[1]), "-o", str(tmp_path / "o.csv"),
                                       "--cuda-binding", "pycuda", "--backend", "onnxruntime", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert seen["cuda_binding"] == "pycuda"


# ------------------------------------------------------------------------------ PyTorch CUDA backend
def test_torch_cuda_backend_fp32_on_cpu_matches_reference(exported):
    from leukedge.engines.torch_backend import TorchBackend
    from leukedge.engines.torch_cuda import TorchCudaBackend

    bundle, _ = exported
    x = np.random.default_rng(1).standard_normal((5, 3, SIZE, SIZE)).astype(np.float32)
    with TorchBackend.from_bundle(bundle, device="cpu") as ref, \
            TorchCudaBackend.from_bundle(bundle, device="cpu", precision="fp32") as b:
        assert b.on_cpu and b.name == "torch-cpu-fp32" and b.memory_format == torch.channels_last
        np.testing.assert_allclose(b.infer(x), ref.infer(x), atol=1e-4)
        np.testing.assert_allclose(b.infer(x[:2]), ref.infer(x[:2]), atol=1e-4)
    with pytest.raises(RuntimeError, match="closed"):
        b.infer(x)
    with pytest.raises(ValueError, match="CUDA graphs"):
        TorchCudaBackend.from_bundle(bundle, device="cpu", graphs=True)


def test_graph_cache_captures_once_per_batch_size():
    from leukedge.engines.torch_cuda import GraphCache

    made = []
    cache = GraphCache(lambda n: made.append(n) or f"graph{n}")
    for n in (8, 8, 4, 8, 4, 16):
        assert cache.get(n) == f"graph{n}"
    assert made == [8, 4, 16] and cache.captures == 3 and sorted(cache.graphs) == [4, 8, 16]


@needs_rtx
def test_auto_order_engine_then_torch_cuda_then_onnxruntime(rtx_export, monkeypatch):
    import leukedge.engines.factory as base
    from leukedge.engines.torch_cuda import TorchCudaBackend

    _, exp = rtx_export
    monkeypatch.setattr(base, "_torch_cuda_available", lambda: True)
    real = TorchCudaBackend.from_bundle.__func__
    monkeypatch.setattr(TorchCudaBackend, "from_bundle",
                        classmethod(lambda cls, p, **k: real(cls, p, device="cpu", precision="fp32")))
    with fake_gpu(H200):  # the 8.9 engine is refused: PyTorch on CUDA comes next
        with get_backend("auto", exp) as b:
            assert isinstance(b, TorchCudaBackend)
            assert b.reason.index("not usable") < b.reason.index("PyTorch on CUDA")
    with fake_gpu(OLD_DRIVER):  # no usable CUDA at all: ONNX Runtime
        with get_backend("auto", exp) as b:
            assert b.name.startswith("onnxruntime") and "too old" in b.reason
