"""What a training run trains: :class:`TrainConfig` (the single source of every setting's default; the
options of ``leukedge train`` and ``leukedge cv`` are derived from it) and recipe files.

A recipe is the part of a configuration that defines the model (:data:`RECIPE_FIELDS`); it is stored in
the bundle (``bundle.json: recipe``) and can be written as a TOML file of ``leukedge train`` options
(``--recipe``; the shipped ones live in ``leukedge/recipes/``). This module imports no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..archs import get_arch

AUGMENT_MODES = ("full", "dihedral", "none")
#: test-time augmentation stored in the bundle (:data:`leukedge.models.TTA_MODES` gives each one's views)
TTA_CHOICES = ("none", "flip", "d4")
#: which epoch's model a run keeps
SELECT_CHOICES = ("best", "last")


@dataclass
class TrainConfig:
    """Every setting of a training run, with its default (``leukedge train``'s option defaults come from here)."""

    arch: str = "efficientnet_lite0"  # a name of leukedge.archs.REGISTRY
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    seed: int = 0
    pretrained: bool = True  # ImageNet initialisation; always False for an arch without ImageNet weights (tiny)
    patience: int = 5  # epochs without a better val F1 before stopping; 0 = never stop early
    workers: int = 0
    resume: bool = False
    device: str = "auto"
    limit: int | None = None
    val_fold: int | None = None
    val_fraction: float = 0.2
    image_level_split: bool = False
    resplit: bool = False  # ignore the cache's train/val split and make a new one
    no_validation: bool = False  # train on every usable row for a fixed number of epochs; keep the last
    augment: str = "full"  # "full" (geometric + photometric), "dihedral" (the 8 symmetries only) or "none"
    class_weighting: bool = True
    label_smoothing: float = 0.0
    # mixup (Zhang et al. 2018): each batch is mixed with a shuffled copy of itself, weight lam ~ Beta(a, a), and the
    # loss is mixed the same way; 0 = off. With a cached frozen prefix the mixing is of its outputs (the inputs of the
    # trained blocks: "manifold mixup" at that layer), else of the normalised images.
    mixup: float = 0.0
    # Gaussian noise on the cell's pixels of every training input, sigma ~ U(0, noise) grey levels (0 = off). With a
    # cached frozen prefix a second cache holds the 8 views of every cell with the noise baked in (training rows
    # read it; validation and test read the clean one).
    noise: float = 0.0
    amp: bool = True
    threads: int | None = None
    half_weights: bool = False  # store the bundle weights as float16
    channels_last: bool = True  # faster convolutions on CPU (and tensor cores)
    freeze_blocks: int = 0  # efficientnet_lite0: freeze the stem and this many early blocks
    # With frozen blocks and dihedral (or no) augmentation, the frozen part's output for the 8 symmetries
    # of every cell is computed once and cached: the same training, several times faster.
    feature_cache: bool = True
    tta: str = "none"  # test-time augmentation stored in the bundle: "none", "flip" or "d4" (8 symmetries)
    threshold: float = 0.5  # decision threshold on P(all), stored in the bundle as a logit shift
    select: str = "best"  # keep the "best" validation epoch, or the "last" one (fixed budget, as in `cv`)
    recipe: str | None = None  # the recipe file these settings came from (recorded in the bundle)
    progress: bool = True  # rich progress bar
    quiet: bool = False  # no per-epoch log lines either
    # Explicit cache rows (cross-validation); when given they replace the automatic split.
    train_indices: list[int] | None = None
    val_indices: list[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.augment, bool):  # older callers: True = full, False = none
            self.augment = "full" if self.augment else "none"
        if self.augment not in AUGMENT_MODES:
            raise ValueError(f"augment must be one of {', '.join(AUGMENT_MODES)}, not {self.augment!r}")
        if self.tta not in TTA_CHOICES:
            raise ValueError(f"tta must be none, flip or d4, not {self.tta!r}")
        if self.select not in SELECT_CHOICES:
            raise ValueError(f"select must be 'best' or 'last', not {self.select!r}")
        if not 0.0 <= float(self.mixup) <= 10.0:
            raise ValueError(f"mixup (the Beta distribution's alpha) must lie in [0, 10], not {self.mixup}")
        if not 0.0 <= float(self.noise) <= 64.0:
            raise ValueError(f"noise (grey levels) must lie in [0, 64], not {self.noise}")
        if not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(f"threshold must lie strictly between 0 and 1, not {self.threshold}")
        if not get_arch(self.arch).pretrained:
            self.pretrained = False  # nothing to start from (what `--arch tiny` always did)

    def uses_feature_cache(self) -> bool:
        """Whether training runs on cached outputs of the frozen blocks (see ``feature_cache``)."""
        return bool(self.feature_cache and self.freeze_blocks > 0 and self.arch == "efficientnet_lite0"
                    and self.augment in ("dihedral", "none"))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("train_indices", "val_indices"):
            if d[k] is not None:
                d[k] = f"<{len(d[k])} rows>"
        return d


def default_of(name: str) -> Any:
    """The default of the :class:`TrainConfig` field ``name`` (what the CLI option shows and uses)."""
    return getattr(TrainConfig(), name)


#: TrainConfig fields that define what is trained (a recipe); the others say how a run is executed.
RECIPE_FIELDS = ("arch", "arch_kwargs", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "pretrained",
                 "patience", "augment", "class_weighting", "label_smoothing", "mixup", "noise", "half_weights", "freeze_blocks",
                 "feature_cache", "tta", "threshold", "select", "no_validation", "seed")


#: Recipe fields that only change what the kept model does at test time (and how it is stored): a finished
#: run resumed with other values re-scores and rewrites its bundle without training again.
TEST_TIME_FIELDS = ("tta", "threshold", "half_weights")

#: TrainConfig fields a recipe file may not set (they describe one run, not a recipe)
_NOT_IN_RECIPES = ("train_indices", "val_indices", "resume", "progress", "quiet")


def recipe_of(cfg: TrainConfig) -> dict[str, Any]:
    """The recipe part of a training configuration, as stored in the bundle (``bundle.json: recipe``)."""
    d = {k: getattr(cfg, k) for k in RECIPE_FIELDS}
    return {"file": cfg.recipe, "settings": d}


#: the recipes shipped inside the package (``leukedge/recipes/NAME.toml``), named by ``--recipe NAME``
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped with the package (``--recipe default`` ...)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def resolve_recipe(name_or_path: str | Path) -> Path:
    """The recipe file that ``--recipe`` names: an existing file as it is, else a shipped recipe by name
    (``default``, ``default.toml``, or the pre-0.2 checkout path ``recipes/default.toml``), which works
    from an installed package too. An unknown name raises ValueError listing the shipped ones."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = RECIPES_DIR / f"{p.stem}.toml"
    if p.suffix in ("", ".toml") and (len(p.parts) == 1 or p.parent.name == "recipes") and shipped.is_file():
        return shipped
    raise ValueError(f"recipe {name_or_path}: no such file and no shipped recipe of that name "
                     f"(shipped: {', '.join(shipped_recipes()) or 'none'})")


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe file (TOML): its keys are ``leukedge train`` options (``lr``, ``freeze-blocks`` ...),
    optionally under a ``[train]`` table. Unknown keys are refused, naming the file. ``path`` may also
    name a shipped recipe (see :func:`resolve_recipe`)."""
    import tomllib  # Python 3.11+; on 3.10 (still supported) only reading a recipe fails

    p = resolve_recipe(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as exc:
        raise ValueError(f"recipe {p}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"recipe {p}: not valid TOML: {exc}") from exc
    if isinstance(data.get("train"), dict):
        data = {**{k: v for k, v in data.items() if k != "train"}, **data["train"]}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        name = {"fp16_weights": "half_weights"}.get(name, name)  # the CLI spelling of the option
        if name in ("description", "notes"):
            continue
        if name not in known or name in _NOT_IN_RECIPES:
            raise ValueError(f"recipe {p}: unknown setting {key!r} (recipe keys are `leukedge train` options)")
        out[name] = value
    return out
