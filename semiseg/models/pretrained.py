"""Safe import of pretrained backbone weights: torchvision ResNets and MobileNetV2 (by name: `imagenet`), the
deep-stem (v1c) ResNets and Xception of the ST++/UniMatch authors, and semiseg's own exports (a Segmentor state
dict: its `backbone.` entries).

Files are read without unpickling code (`torch.load(weights_only=True)`, or safetensors); URLs are downloaded
once into ~/.cache/semiseg. Shape mismatches raise CheckpointError naming the key and both shapes; missing and
unexpected keys are returned in a LoadReport whose `summary()` is one line.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from semiseg.errors import CheckpointError

CACHE_DIR = Path.home() / ".cache" / "semiseg"
TORCHVISION = "https://download.pytorch.org/models/"
NAMED_WEIGHTS: dict[str, dict[str, str]] = {
    "imagenet": {
        "resnet18": TORCHVISION + "resnet18-f37072fd.pth",
        "resnet34": TORCHVISION + "resnet34-b627a593.pth",
        "resnet50": TORCHVISION + "resnet50-0676ba61.pth",
        "resnet101": TORCHVISION + "resnet101-63fe2227.pth",
        "mobilenet_v2": TORCHVISION + "mobilenet_v2-b0353104.pth",
    },
    "imagenet_v2": {
        "resnet50": TORCHVISION + "resnet50-11ad3fa6.pth",
        "resnet101": TORCHVISION + "resnet101-cd907fc2.pth",
        "mobilenet_v2": TORCHVISION + "mobilenet_v2-7ebf99e0.pth",
    },
    "dinov2": {
        f"dinov2_{name}": f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{s}14/dinov2_vit{s}14_pretrain.pth"
        for name, s in (("small", "s"), ("base", "b"), ("large", "l"))
    },
}
"""`model.pretrained` names -> backbone -> URL: torchvision's IMAGENET1K_V1 (`imagenet`) and IMAGENET1K_V2
(`imagenet_v2`) classification checkpoints and Meta's self-supervised DINOv2 ones (`dinov2`), downloaded once into
CACHE_DIR. They need the torchvision layout of
each backbone (ResNets: `model.stem: torchvision`, width 64; MobileNetV2: width_mult 1.0)."""
CONTAINER_KEYS = ("state_dict", "model", "model_state")
# Classifier of ImageNet checkpoints; a segmentation backbone has no use for it.
CLASSIFIER_PREFIXES = ("fc.",)
# Older checkpoints lack BN's step counter; it is unused in training mode with a momentum, so never report it.
OPTIONAL_SUFFIXES = ("num_batches_tracked",)


@dataclass(frozen=True)
class LoadReport:
    """What load_backbone_weights did: keys loaded, model keys left untouched, checkpoint keys not used."""

    source: str
    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]

    def summary(self) -> str:
        """One line: counts, and the first few missing/unexpected keys."""
        line = f"{self.source}: loaded {len(self.loaded)} tensors"
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
                line += f"; {len(keys)} {label} ({shown})"
        return line

    def __str__(self) -> str:
        return self.summary()


def first_line(e: BaseException) -> str:
    """The exception's type and the first line of its message, for one-line errors."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def is_url(path_or_url: str) -> bool:
    """True for http(s) and file:// URLs (downloaded, or copied, into the cache)."""
    return urlparse(str(path_or_url)).scheme in ("http", "https", "file")


def fetch(url: str, cache_dir: Path | None = None) -> Path:
    """Local copy of `url` in cache_dir (default CACHE_DIR), downloaded on first use."""
    cache_dir = CACHE_DIR if cache_dir is None else cache_dir
    dst = cache_dir / (Path(urlparse(url).path).name or "weights.pth")
    if not dst.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(dst), progress=True)
        except Exception as e:
            raise CheckpointError(f"{url}: download failed: {first_line(e)}") from None
    return dst


def unwrap(obj: object, source: str) -> dict[str, Tensor]:
    """The tensor dict inside a checkpoint: descends into "state_dict" / "model" / "model_state" containers."""
    while isinstance(obj, dict):
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{source}: no tensors found (top-level keys: {', '.join(map(str, list(obj)[:8]))})")
    return tensors


def strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Removes `prefix` from the keys that start with it (e.g. DataParallel's "module.")."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}


def unpickler_reason(e: pickle.UnpicklingError) -> str:
    """The informative line of torch's weights_only refusal (which global was refused), without its advice."""
    lines = [line.strip() for line in str(e).splitlines()]
    reason = next((line for line in lines if line.startswith("WeightsUnpickler error:")), lines[0] if lines else "")
    reason = reason.removeprefix("WeightsUnpickler error:").split(". Please use")[0].strip()
    return f"it contains more than tensors ({reason}); only plain state dicts are read"


def read_state_dict(path_or_url: str | Path) -> dict[str, Tensor]:
    """Tensors of a .pth/.pt/.safetensors file or URL, containers unwrapped and "module." prefixes removed."""
    source = str(path_or_url)
    path = fetch(source) if is_url(source) else Path(source).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{source}: weight file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except SafetensorError as e:
            raise CheckpointError(f"{source}: not a readable safetensors file: {first_line(e)}") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{source}: refused to load: {unpickler_reason(e)}") from None
        except Exception as e:
            raise CheckpointError(f"{source}: not a readable torch checkpoint: {first_line(e)}") from None
    state = unwrap(obj, source)
    while any(k.startswith("module.") for k in state):
        state = strip_prefix(state, "module.")
    return state


def resolve_weights(name_or_path: str, backbone: str) -> str:
    """`model.pretrained` as a path or URL: a NAMED_WEIGHTS name becomes its URL for `backbone`."""
    if name_or_path not in NAMED_WEIGHTS:
        return name_or_path
    urls = NAMED_WEIGHTS[name_or_path]
    if backbone not in urls:
        have = ", ".join(urls) or "none"
        raise CheckpointError(
            f"model.pretrained={name_or_path}: no public checkpoint known for backbone {backbone} "
            f"(known for {have}); pass a local path or URL"
        )
    return urls[backbone]


def weights_normalization(path_or_url: str | Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) a safetensors file declares in its metadata (`input_normalization: ... mean=(a,b,c)
    std=(a,b,c)`), or None: torchvision checkpoints carry none and use ImageNet's."""
    source = str(path_or_url)
    path = fetch(source) if is_url(source) else Path(source).expanduser()
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get("input_normalization", "")
    except Exception:
        return None
    found = {k: re.search(k + r"\s*=\s*\(([^)]*)\)", text) for k in ("mean", "std")}
    if not all(found.values()):
        return None
    try:
        mean, std = (tuple(float(v) for v in found[k].group(1).split(",")) for k in ("mean", "std"))
    except ValueError:
        return None
    return (mean, std) if len(mean) == len(std) == 3 else None


def backbone_entries(state: dict[str, Tensor], head_prefixes: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """The backbone's part of a checkpoint: its `backbone.` entries if it has any, else all but the classification
    head (`fc.`, and the backbone's own `head_prefixes`, e.g. MobileNetV2's last 1x1 conv and classifier)."""
    if any(k.startswith("backbone.") for k in state):
        return {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    return {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIXES + tuple(head_prefixes))}


def stem_hint(model_keys: set[str], ckpt_keys: set[str]) -> str:
    """A config hint when the checkpoint and the model use different ResNet stems, else ""."""
    if "conv1.0.weight" in ckpt_keys and "conv1.weight" in model_keys:
        return " (the checkpoint has the deep v1c stem: set model.stem: deep)"
    if "conv1.weight" in ckpt_keys and "conv1.0.weight" in model_keys:
        return " (the checkpoint has the 7x7 stem: set model.stem: torchvision)"
    return ""


def load_backbone_weights(backbone: nn.Module, path_or_url: str | Path) -> LoadReport:
    """Copies matching tensors of a checkpoint into `backbone`; raises CheckpointError on any shape mismatch."""
    source = str(path_or_url)
    state = backbone_entries(read_state_dict(path_or_url), getattr(backbone, "head_prefixes", ()))
    model_state = backbone.state_dict()
    hint = stem_hint(set(model_state), set(state))
    mismatched = [k for k, v in state.items() if k in model_state and v.shape != model_state[k].shape]
    if mismatched:
        k = mismatched[0]
        more = f" (and {len(mismatched) - 1} more mismatched keys)" if len(mismatched) > 1 else ""
        raise CheckpointError(
            f"{source}: {k} has shape {tuple(state[k].shape)} in the checkpoint but "
            f"{tuple(model_state[k].shape)} in the model{more}{hint}"
        )
    loaded = tuple(k for k in state if k in model_state)
    if not [k for k in loaded if not k.endswith(OPTIONAL_SUFFIXES)]:
        example = ", ".join(list(state)[:3])
        raise CheckpointError(f"{source}: no key matches the backbone (checkpoint keys like {example}){hint}")
    backbone.load_state_dict({k: state[k] for k in loaded}, strict=False)
    missing = tuple(k for k in model_state if k not in state and not k.endswith(OPTIONAL_SUFFIXES))
    unexpected = tuple(k for k in state if k not in model_state)
    return LoadReport(source, loaded, missing, unexpected)
