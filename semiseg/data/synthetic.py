"""The embedded demo dataset: procedural scenes of textured shapes, deterministic from (seed, split, index).

Each of six object classes has its own shape and its own texture (disc/radial shading, square/checker,
triangle/dots, ring/gradient, cross/grain, wavy blob/stripes). An object's hue lies near its class hue, but
neighbouring classes overlap and saturation, value and lighting are random, so colour is a cue, never a proof.
Scenes add what makes real segmentation hard: cluttered textured backgrounds
with distractors that reuse the class textures on other shapes (bars, elongated ellipses, irregular
patches), objects that occlude each other, lighting gradients, brightness/contrast changes and noise.
A scene is drawn in normalised coordinates, so the same (seed, split, index) gives the same scene at any size.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
from PIL import Image

from semiseg.data.info import DatasetInfo

CLASSES = ("background", "disc", "square", "triangle", "ring", "cross", "stripes")
PALETTE = (
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
)  # fmt: skip
SYNTHETIC = DatasetInfo(name="synthetic", classes=CLASSES, palette=PALETTE)

SPLITS = {"train": 0, "val": 1, "test": 2}
"""split name -> seed stream: the splits of one seed never share a scene"""

TEXTURES = ("shade", "checker", "dots", "gradient", "grain", "stripes")
CLASS_TEXTURE = dict(zip(CLASSES[1:], TEXTURES))
"""each object class wears one texture; background distractors are plain or, sometimes, wear one of them"""

CLASS_HUE_SPREAD = 0.12
"""object colours: base hue within +-this many turns of the class hue (classes sit 1/6 turn apart, so
neighbours overlap); colour is a cue, never a proof"""

DECOY_TEXTURE_P = 0.3
"""probability that a background distractor wears a class texture (so texture alone is not enough)"""


def sample_name(split: str, index: int) -> str:
    """Id of a synthetic sample: 'train_00012'."""
    return f"{split}_{index:05d}"


def parse_name(name: str) -> tuple[str, int] | None:
    """'train_00012' -> ('train', 12); None when `name` is not a synthetic sample id."""
    split, _, index = name.rpartition("_")
    if split not in SPLITS or not index.isdigit():
        return None
    return split, int(index)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1): y (S, 1) and x (1, S), float32."""
    t = ((np.arange(size, dtype=np.float32) + 0.5) / size).astype(np.float32)
    return t[:, None], t[None, :]


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field (S, S) in [0, 1]: a (cells+1)^2 random lattice, smoothstep-interpolated."""
    lattice = rng.random((cells + 1, cells + 1), dtype=np.float32)
    t = (np.arange(size, dtype=np.float32) + 0.5) * (cells / size)
    i = np.minimum(t.astype(np.int64), cells - 1)
    f = t - i.astype(np.float32)
    f = f * f * (3 - 2 * f)
    rows = lattice[i] * (1 - f)[:, None] + lattice[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _box(cx: float, cy: float, reach: float, size: int) -> tuple[slice, slice]:
    """Pixel rows and columns of the square of half-side `reach` around (cx, cy), clipped to the image."""
    lo_y, hi_y = max(0, int((cy - reach) * size)), min(size, int((cy + reach) * size) + 2)
    lo_x, hi_x = max(0, int((cx - reach) * size)), min(size, int((cx + reach) * size) + 2)
    return slice(lo_y, hi_y), slice(lo_x, hi_x)


def _frame(box: tuple[slice, slice], cx: float, cy: float, angle: float, size: int):
    """Object-frame coordinates (u, v) of the pixels in `box`, rotated by `angle` around (cx, cy)."""
    y, x = _grid(size)
    dy, dx = y[box[0]] - cy, x[:, box[1]] - cx
    c, s = math.cos(angle), math.sin(angle)
    return c * dx + s * dy, c * dy - s * dx


def _shape(kind: str, u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean footprint of a shape of radius `r` in its own frame."""
    if kind == "disc":
        return u * u + v * v < r * r
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.8 * r
    if kind == "triangle":
        inside = np.ones(np.broadcast_shapes(u.shape, v.shape), bool)
        for k in range(3):
            a = math.pi / 2 + k * 2 * math.pi / 3
            inside &= u * math.cos(a) + v * math.sin(a) < 0.6 * r
        return inside
    if kind == "ring":
        d2 = u * u + v * v
        return (d2 < r * r) & (d2 > (0.5 * r) ** 2)
    if kind == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au < 0.3 * r) & (av < r)) | ((av < 0.3 * r) & (au < r))
    if kind == "stripes":
        phi = np.arctan2(v, u)
        wobble = 1 + 0.18 * np.sin(3 * phi + rng.uniform(0, 6.3)) + 0.1 * np.sin(5 * phi + rng.uniform(0, 6.3))
        return u * u + v * v < (0.9 * r * wobble) ** 2
    if kind == "bar":
        return (np.abs(u) < r) & (np.abs(v) < rng.uniform(0.006, 0.018))
    if kind == "ellipse":
        b = r / rng.uniform(2.5, 4.5)
        return (u / r) ** 2 + (v / b) ** 2 < 1
    raise ValueError(kind)


def _texture(kind: str, u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    """Texture field in [0, 1] over the object frame (periods in image units, so it is size-independent)."""
    if kind == "plain":
        return np.zeros((1, 1), np.float32)
    if kind == "shade":
        return np.clip((u * u + v * v) / (r * r), 0, 1)
    if kind == "checker":
        p = rng.uniform(0.3, 0.5) * r
        return ((np.floor(u / p) + np.floor(v / p)) % 2).astype(np.float32)
    if kind == "dots":
        p = rng.uniform(0.045, 0.07)
        return (np.sin(2 * np.pi * u / p) * np.sin(2 * np.pi * v / p) > 0.35).astype(np.float32)
    if kind == "gradient":
        return np.clip(0.5 + 0.5 * u / r, 0, 1)
    if kind == "grain":
        # hashed lattice noise: cheap, deterministic and independent of the image size
        cell = rng.uniform(0.015, 0.025)
        iu, iv = np.floor(u / cell).astype(np.int64), np.floor(v / cell).astype(np.int64)
        h = (iu * 73856093) ^ (iv * 19349663) ^ int(rng.integers(1 << 30))
        return ((h * 2654435761) % 1024).astype(np.float32) / 1023
    if kind == "stripes":
        p = rng.uniform(0.035, 0.065)
        return 0.5 + 0.5 * np.sin(2 * np.pi * u / p)
    raise ValueError(kind)


def _decoy_texture(rng: np.random.Generator) -> str:
    return TEXTURES[rng.integers(len(TEXTURES))] if rng.random() < DECOY_TEXTURE_P else "plain"


def _hsv(hue: float, sat: float, val: float) -> np.ndarray:
    """RGB in [0, 1] of a hue (turns), saturation and value."""
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6
    return (val - val * sat * np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


def _colours(rng: np.random.Generator, label: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Two RGB colours in [0, 1] that a texture blends: a base and a visibly different second one.

    Objects of class `label` take a base hue near their class hue, within CLASS_HUE_SPREAD, so neighbouring
    classes overlap in colour; distractors (label None) take any colour.
    """
    if label is not None:
        hue = (label - 1) / (len(CLASSES) - 1) + rng.uniform(-CLASS_HUE_SPREAD, CLASS_HUE_SPREAD)
        sat, val = rng.uniform(0.5, 1.0), rng.uniform(0.35, 1.0)
        # the texture's second colour keeps the hue family and differs in value
        val_b = val - 0.35 if val > 0.65 else val + 0.35
        return _hsv(hue, sat, val), _hsv(hue + rng.uniform(-0.04, 0.04), rng.uniform(0.5, 1.0), val_b)
    a = rng.random(3, dtype=np.float32)
    d = rng.standard_normal(3).astype(np.float32)
    b = np.clip(a + d / np.linalg.norm(d) * rng.uniform(0.3, 0.6), 0, 1)
    return a, b


def _draw(img, mask, rng, size, shape, texture, label, cx, cy, r):
    """Paint one textured shape (and its label, unless None) over what is there: later shapes occlude."""
    angle = rng.uniform(0, 2 * np.pi)
    box = _box(cx, cy, 1.45 * r, size)
    u, v = _frame(box, cx, cy, angle, size)
    inside = _shape(shape, u, v, r, rng)
    t = np.broadcast_to(_texture(texture, u, v, r, rng), inside.shape)[inside]
    a, b = _colours(rng, label or None)
    img[box][inside] = a + (b - a) * t[:, None]
    if label is not None:
        mask[box][inside] = label


def render(size: int, seed: int, split: str, index: int, clutter: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Scene `index` of `split`: image uint8 (S, S, 3) RGB and mask uint8 (S, S) in 0..6.

    `clutter` in [0, 1] scales the background distractors, the occluding bars and the noise (1 = the full task).
    """
    rng = np.random.default_rng((seed, SPLITS[split], index))
    y, x = _grid(size)
    c1, c2 = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
    low = _value_noise(rng, size, int(rng.integers(2, 5)))
    img = c1 + (c2 - c1) * low[..., None]
    img += (rng.uniform(0.05, 0.2) * (_value_noise(rng, size, 16) - 0.5))[..., None]
    mask = np.zeros((size, size), np.uint8)

    if rng.random() < 0.5 * clutter:
        patch = _value_noise(rng, size, int(rng.integers(3, 6))) > rng.uniform(0.6, 0.7)
        texture = _texture(_decoy_texture(rng), x - 0.5, y - 0.5, 0.5, rng)
        a, b = _colours(rng)
        img[patch] = (a + (b - a) * np.broadcast_to(texture, patch.shape)[patch][:, None]).astype(np.float32)
    for _ in range(round(int(rng.integers(2, 7)) * clutter)):
        shape = "bar" if rng.random() < 0.5 else "ellipse"
        r = rng.uniform(0.15, 0.4) if shape == "bar" else rng.uniform(0.08, 0.17)
        texture = _decoy_texture(rng)
        _draw(img, mask, rng, size, shape, texture, None, rng.uniform(0, 1), rng.uniform(0, 1), r)

    for _ in range(int(rng.integers(2, 6))):
        label = int(rng.integers(1, len(CLASSES)))
        shape = CLASSES[label]
        r = rng.uniform(0.1, 0.22)
        _draw(img, mask, rng, size, shape, CLASS_TEXTURE[shape], label, rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), r)

    if rng.random() < 0.3 * clutter:
        # a bar in front of the objects: occlusion by background clutter
        _draw(img, mask, rng, size, "bar", "grain", 0, rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.2, 0.4))

    gx, gy = rng.uniform(-0.6, 0.6, 2).tolist()
    light = rng.uniform(0.6, 1.25) * (1 + gx * (x - 0.5) + gy * (y - 0.5))
    img *= light[..., None]
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.6, 1.2) + mean
    # uniform noise of the same std as Gaussian noise: five times cheaper to draw
    img += clutter * rng.uniform(0.01, 0.06) * 12**0.5 * (rng.random(img.shape, dtype=np.float32) - 0.5)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), mask


def write_folder(dest: str | Path, size: int = 96, seed: int = 0, n_train: int = 400, n_val: int = 100) -> Path:
    """Write the dataset in the `folder` layout (images/, masks/ as palette PNGs, train.txt, val.txt, data.yaml)."""
    dest = Path(dest)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    (dest / "masks").mkdir(parents=True, exist_ok=True)
    flat_palette = [c for rgb in PALETTE for c in rgb]
    for split, count in (("train", n_train), ("val", n_val)):
        lines = []
        for index in range(count):
            name = sample_name(split, index)
            image, mask = render(size, seed, split, index)
            Image.fromarray(image).save(dest / "images" / f"{name}.png")
            label = Image.fromarray(mask, mode="P")
            label.putpalette(flat_palette)
            label.save(dest / "masks" / f"{name}.png")
            lines.append(f"images/{name}.png masks/{name}.png\n")
        (dest / f"{split}.txt").write_text("".join(lines))
    (dest / "classes.txt").write_text("".join(c + "\n" for c in CLASSES))
    colors = ", ".join(f"[{r}, {g}, {b}]" for r, g, b in PALETTE)
    (dest / "data.yaml").write_text(
        "# the synthetic dataset as a `folder` dataset: merge this section into a config\n"
        "data:\n"
        "  dataset: folder\n"
        f"  root: {dest.resolve()}\n"
        f"  classes: [{', '.join(CLASSES)}]\n"
        f"  colors: [{colors}]\n"
    )
    return dest


def describe(size: int = 96, n_train: int = 400, n_val: int = 100, seed: int = 0) -> str:
    """A few lines telling a newcomer what the demo dataset is."""
    objects = ", ".join(f"{c} ({t})" for c, t in CLASS_TEXTURE.items())
    return (
        f"synthetic: {n_train} train + {n_val} val procedural scenes of {size}x{size} px (seed {seed}), "
        f"{len(CLASSES)} classes.\n"
        f"  objects, each with its own shape and texture: {objects}; everything else is background.\n"
        "  hues cluster per class but overlap, so a model must also learn shape and texture; backgrounds are\n"
        "  cluttered"
        " with bars, ellipses and patches of any colour wearing the same textures; objects occlude each other;\n"
        "  lighting gradients, contrast changes and noise vary per image."
    )
