"""Typed configuration: frozen dataclasses, strict YAML loading, dotted overrides.

A run is described by one `Config` with six sections (data, model, optim, train, eval, method).
YAML presets are loaded strictly: an unknown key or a value of the wrong type is one `ConfigError`
naming the key and the file. `--set a.b=c` overrides are parsed as YAML scalars and coerced to the
field's type. The `method` section is validated against the chosen method's own `Config` class, looked up in the
`methods` table the caller passes (semiseg.methods.METHODS; `semiseg.methods.load_config` passes it), so this
module imports no method.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from semiseg.errors import SemisegError


class ConfigError(SemisegError, ValueError):
    """A configuration problem, reported as one line naming the key and the source."""


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "synthetic"
    """reader: synthetic | camvid | pascal | cityscapes | coco | folder"""
    root: str = ""
    """dataset root folder (unused by synthetic)"""
    labeled: str = ""
    """labeled split: a labeled.txt path, a fraction '1/8' or a count '20' of train_split"""
    unlabeled: str = ""
    """unlabeled split: an unlabeled.txt path; empty = the rest of train_split"""
    split_seed: int = 0
    """seed of the labeled subset drawn from train_split when `labeled` is a fraction or count"""
    train_split: str = "train"
    """split name the training ids come from"""
    val_split: str = "val"
    """split name used for evaluation during training"""
    resize: float = 1.0
    """fixed factor applied to every image and mask when read (0.5 = half resolution; CPU protocols)"""
    crop: int = 321
    """square training crop size in pixels"""
    scale_range: tuple[float, float] = (0.5, 2.0)
    """random rescale range of the weak transform, relative to the long side"""
    base_size: int = 0
    """rescale relative to this long side (ST++: 400 VOC, 2048 Cityscapes); 0 = the image's own long side"""
    batch_size: int = 2
    """labeled crops per step per process"""
    batch_size_u: int = 2
    """unlabeled crops per step per process"""
    workers: int = 2
    """data loader worker processes per loader"""
    repeat_labeled: int = 1
    """minimum number of copies of the labeled list in a training list (ST / ST++ / BST teachers: at least 2 below
    method.small_split ids, the reference's `ids * 2`)"""
    synthetic_train: int = 400
    """synthetic dataset: number of train images"""
    synthetic_val: int = 100
    """synthetic dataset: number of val images"""
    synthetic_size: int = 96
    """synthetic dataset: image side in pixels"""
    synthetic_seed: int = 0
    """synthetic dataset: generator seed"""
    synthetic_clutter: float = 1.0
    """synthetic dataset: background distractors, occluders and noise, 0 (clean scenes) to 1 (the full task)"""
    images_dir: str = "images"
    """folder dataset: images folder, relative to root"""
    masks_dir: str = "masks"
    """folder dataset: masks folder, relative to root"""
    classes: tuple[str, ...] = ()
    """folder dataset: class names (index order)"""
    colors: tuple[tuple[int, int, int], ...] = ()
    """folder dataset: RGB colour of each class, for RGB masks and colour outputs"""


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet101"
    """resnet18 | resnet34 | resnet50 | resnet101 | xception65 | mobilenet_v2 | dinov2_small | dinov2_base |
    dinov2_large"""
    stem: str = "deep"
    """ResNet stem: deep (v1c, three 3x3 convs; UniMatch/DSSN) | torchvision (7x7; ST++)"""
    width: int = 64
    """ResNet base width (64 = standard; 16 or 32 for CPU-sized models)"""
    output_stride: int = 16
    """8 or 16: the last stages are dilated instead of strided"""
    multi_grid: tuple[int, ...] = ()
    """ResNet: layer4's per-block dilation multipliers (DeepLabV3's Multi-Grid; CPS / CTT: 1,2,4 at OS 16 = dilations
    2/4/8); empty = torchvision's dilation scheme"""
    head: str = "deeplabv3plus"
    """deeplabv3plus | deeplabv3plus_cps (CPS / CTT's form: BN over the ASPP concatenation, LeakyReLU, pooled branch
    added) | deeplabv3 | deeplabv2 | deeplabv2_ctt | dpt (DINOv2 backbones)"""
    aspp_rates: tuple[int, ...] = ()
    """atrous rates; empty = (6, 12, 18) at OS16, (12, 24, 36) at OS8 (DeepLabV2: 6, 12, 18, 24)"""
    head_channels: int = 256
    """ASPP / decoder width"""
    low_level_channels: int = 48
    """DeepLabV3+ projection width of the stride-4 features"""
    dropout: bool = False
    """ST++ head dropouts (Dropout2d 0.5 after ASPP projection, 0.1 before the classifier)"""
    fp_dropout: float = 0.5
    """channel dropout of the feature-perturbation streams (UniMatch/DSSN)"""
    proj_dim: int = 0
    """projection head output size for contrastive methods; 0 = none"""
    pretrained: str = ""
    """backbone weights: a name (`imagenet`, `imagenet_v2`: torchvision's checkpoints; `dinov2`: Meta's; downloaded
    once into the cache), a local path or a URL (.pth/.pt/.safetensors; torchvision or deep-stem names); empty =
    random init"""
    input_mean: tuple[float, ...] = ()
    """RGB mean the model subtracts from [0, 1] images; empty = the weights' own (safetensors metadata), else
    the backbone's default (ImageNet's (0.485, 0.456, 0.406))"""
    input_std: tuple[float, ...] = ()
    """RGB std the model divides by; empty = the weights' own, else the backbone's default"""
    width_mult: float = 1.0
    """MobileNetV2 width multiplier (1.0 = the ImageNet checkpoints)"""
    tf_padding: bool = False
    """MobileNetV2: TF "SAME" padding of the stride-2 convs (weights converted from TensorFlow were trained so)"""
    sync_bn: bool = False
    """convert BatchNorm to SyncBatchNorm under distributed training"""


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"
    """sgd | adamw | adam"""
    lr: float = 0.001
    """backbone learning rate"""
    head_lr_mult: float = 10.0
    """learning-rate multiplier of every non-backbone parameter"""
    momentum: float = 0.9
    """SGD momentum"""
    weight_decay: float = 1e-4
    """weight decay"""
    no_decay_norm_bias: bool = False
    """exclude norm weights and biases from weight decay (CPS-style groups)"""
    poly_power: float = 0.9
    """poly schedule: lr * (1 - step / iters) ** power"""
    schedule: str = "poly"
    """poly: every parameter group follows the poly schedule (heads x head_lr_mult) | poly_backbone_only: CTT's
    DeepLabV3+ script as run: the backbone follows it, the backbone's no-decay group at x head_lr_mult, every head
    group stays at lr (METHODS.md 5(g); needs no_decay_norm_bias, the script's CPS groups)"""
    warmup_iters: int = 0
    """linear warm-up steps before the poly schedule"""
    grad_clip: float = 0.0
    """clip the global gradient norm to this value; 0 = off"""
    accumulate: int = 1
    """gradient accumulation: micro-batches per optimizer step"""

    def __post_init__(self):
        if self.schedule not in ("poly", "poly_backbone_only"):
            raise ValueError(f"schedule must be poly or poly_backbone_only, got {self.schedule!r}")
        if self.schedule == "poly_backbone_only" and not self.no_decay_norm_bias:
            raise ValueError("schedule poly_backbone_only reproduces CPS-style groups: set no_decay_norm_bias: true")


@dataclass(frozen=True)
class TrainConfig:
    iters: int = 0
    """optimizer steps; 0 = derived from epochs"""
    epochs: float = 0.0
    """epochs over the unlabeled set (labeled set for supervised methods); used when iters = 0"""
    full_iters: int = 0
    """semiseg bench: steps of the `full` reference (every train label; 0 = the methods' steps); it sees many
    more distinct images than a 1/8 run and needs more steps to reach its plateau"""
    seed: int = 0
    """seed of the run (model init, sampling, augmentation)"""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""
    amp: str = "auto"
    """mixed precision: auto (CUDA: bf16 if supported, else fp16; CPU: bf16 where native, AVX512-BF16 / AMX, else
    off) | bf16 | fp16 (CUDA only) | off"""
    channels_last: str = "auto"
    """channels_last memory format: auto (on CUDA, where tensor-core convolutions want it; off on CPU, where its
    effect depends on the model and shapes: README, training speed) | on | off"""
    compile: bool = False
    """torch.compile the trained networks' encoders (engine.loop.compile_encoders)"""
    log_every: int = 20
    """steps between progress lines"""
    ckpt_every: int = 0
    """steps between `last` checkpoints; 0 = at every evaluation"""
    mix_partner: str = "roll"
    """CutMix partners: roll (the unlabeled batch rolled by one) | stream (a second unlabeled loader)"""
    deterministic: bool = False
    """request deterministic kernels (slower on GPU)"""

    def __post_init__(self):
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        if self.channels_last not in ("auto", "on", "off"):
            raise ValueError(f"channels_last must be auto, on or off, got {self.channels_last!r}")
        if self.mix_partner not in ("roll", "stream"):
            raise ValueError(f"mix_partner must be roll or stream, got {self.mix_partner!r}")


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0
    """steps between evaluations; 0 = only at the end"""
    per_epoch: bool = False
    """evaluate after every epoch of the fit's own list (ST++ validates every epoch; each self-training stage has its
    own list), and at the end; replaces eval.every (leave it 0)"""
    mode: str = ""
    """whole | sliding | multiscale | center_crop; empty = the dataset's default"""
    window: int = 0
    """sliding window size; 0 = the training crop"""
    stride: float = 2 / 3
    """sliding window stride as a fraction of the window"""
    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    """multiscale mode: test scales"""
    flip: bool = True
    """multiscale mode: add horizontal flips"""
    batch_size: int = 1
    """images per evaluation batch (images are grouped by size)"""
    max_images: int = 0
    """evaluate on the first N images only; 0 = all"""

    def __post_init__(self):
        if self.per_epoch and self.every > 0:
            raise ValueError(f"per_epoch evaluates once per epoch: leave every at 0, got every={self.every}")


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's Config: the method name; each method adds its own fields."""

    name: str = "supervised"
    """method: a key of semiseg.methods.METHODS"""
    criterion: str = "ce"
    """loss on labeled pixels: ce | ohem (Cityscapes recipes)"""
    ohem_thresh: float = 0.7
    """OHEM: keep pixels whose ground-truth probability is at most this (or the min_kept hardest)"""
    ohem_min_kept: int = 200000
    """OHEM: keep at least this many pixels per batch"""

    def __post_init__(self):
        if self.criterion not in ("ce", "ohem"):
            raise ValueError(f"criterion must be ce or ohem, got {self.criterion!r}")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    """what to read and how to crop it"""
    model: ModelConfig = field(default_factory=ModelConfig)
    """backbone and head"""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """optimizer and schedule"""
    train: TrainConfig = field(default_factory=TrainConfig)
    """loop length, precision, seed"""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """evaluation mode and frequency"""
    method: MethodConfig = field(default_factory=MethodConfig)
    """the method and its hyperparameters"""


SECTIONS = ("data", "model", "optim", "train", "eval", "method")


def method_config_class(name: str, methods: Mapping[str, Any], where: str = "") -> type:
    """The Config dataclass of method `name` in `methods` (name -> anything with a `Config` class)."""
    if name not in methods:
        raise ConfigError(f"{where}method.name: unknown method {name!r}; choose from {', '.join(methods)}")
    return methods[name].Config


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Convert a YAML value to the annotated type `tp` or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"{where}{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                pass
        raise bad
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(_fraction(value))
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool):  # YAML 1.1 reads a bare `off` / `on` (train.amp: off) as false / true
            return "on" if value else "off"
        raise bad
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
            value = [yaml.safe_load(v) for v in value]
        if not isinstance(value, (list, tuple)):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args)))
    raise bad


def _fraction(text: str) -> float:
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


def _build(cls: type, values: dict, prefix: str, where: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, strictly."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}{prefix.rstrip('.')}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"{where}{prefix}{key}: unknown key; known keys: {', '.join(sorted(known))}")
    kwargs = {}
    for f in fields(cls):
        if f.name in values:
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                kwargs[f.name] = _build(tp, values[f.name] or {}, f"{prefix}{f.name}.", where)
            else:
                kwargs[f.name] = _coerce(values[f.name], tp, prefix + f.name, where)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}{prefix.rstrip('.') or cls.__name__}: {err}") from None


def from_dict(raw: dict, methods: Mapping[str, Any], where: str = "") -> Config:
    """Build a Config from a nested mapping, the method section by `methods[name].Config`; `where` prefixes error
    messages (e.g. 'configs/x.yaml: ')."""
    raw = dict(raw or {})
    for key in raw:
        if key not in SECTIONS:
            raise ConfigError(f"{where}{key}: unknown section; sections: {', '.join(SECTIONS)}")
    method_raw = dict(raw.pop("method", None) or {})
    name = method_raw.get("name", MethodConfig.name)
    if not isinstance(name, str):
        raise ConfigError(f"{where}method.name: expected str, got {name!r}")
    method_cls = method_config_class(name, methods, where)
    cfg = _build(Config, raw, "", where)
    method = _build(method_cls, method_raw, "method.", where)
    return dataclasses.replace(cfg, method=method)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (tuples become lists), suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def dump(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=0.002' -> (['optim', 'lr'], 0.002)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key=value")
    key, value = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {text}: empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return path, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply dotted `key=value` overrides to a raw nested mapping (before validation)."""
    raw = _deepcopy(raw or {})
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; errors name the file (and line where YAML knows it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{line}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...], methods: Mapping[str, Any]) -> Config:
    """Load a YAML preset (or defaults when `path` is None), apply `--set` overrides, validate against `methods`."""
    raw = read_yaml(path) if path else {}
    raw = apply_overrides(raw, list(overrides))
    where = f"{path}: " if path else ""
    return from_dict(raw, methods, where)


def replace(cfg: Config, **sections: dict) -> Config:
    """Copy of `cfg` with some fields of some sections replaced: replace(cfg, optim={'lr': 0.1}); validated."""
    out = {}
    for section, values in sections.items():
        current = getattr(cfg, section)
        out[section] = _build(type(current), {**to_dict(current), **values}, f"{section}.", "")
    return dataclasses.replace(cfg, **out)
