"""Strong augmentation, batched on the training device (torch only).

Images are (B, 3, H, W), uint8 or float in [0, 1]. Every random op returns the input's shape, dtype and
device (uint8 in, uint8 out, rounded once at the end). Per-sample randomness (coins, factors, orders, boxes)
is drawn on the CPU from an explicit `torch.Generator` and only then moved to the images' device, so one
seed gives the same views on CPU and GPU, and on resume. Samples whose coin says no are returned bit for bit.

Semantics follow the reference implementations: torchvision's ColorJitter / RandomGrayscale / GaussianBlur
as used by UniMatch and ST++ (METHODS.md 1.1(c), 1.2(c)), UniMatch's CutMix box, ST++'s Cutout, ClassMix
(CTT, 5(c)) and AugSeg's random intensity operations (DSSN, 4(c)). The deterministic kernels
(`adjust_*`, `blur`, `equalize`, ...) take float images in [0, 1] and per-sample parameters of shape (B,).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from semiseg.data.info import IGNORE

LUMA = (0.299, 0.587, 0.114)
"""ITU-R 601-2 luma weights, as PIL's convert('L')"""


@dataclass(frozen=True)
class StrongAugConfig:
    """Probabilities and ranges of the strong view; defaults are UniMatch's (and ST++'s SDA)."""

    jitter_p: float = 0.8
    """probability of colour jitter"""
    brightness: float = 0.5
    """brightness factor ~ U[max(0, 1 - b), 1 + b]"""
    contrast: float = 0.5
    """contrast factor ~ U[max(0, 1 - c), 1 + c]"""
    saturation: float = 0.5
    """saturation factor ~ U[max(0, 1 - s), 1 + s]"""
    hue: float = 0.25
    """hue shift ~ U[-h, h], in turns (0.5 = half the colour wheel)"""
    grayscale_p: float = 0.2
    """probability of grayscale"""
    blur_p: float = 0.5
    """probability of Gaussian blur"""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """blur sigma range in pixels (PIL's GaussianBlur radius)"""
    intensity_ops: int = 0
    """DSSN (VOC): up to this many AugSeg random intensity ops after the blur; 0 = off"""
    intensity_random_num: bool = True
    """draw the number of intensity ops from U{1..intensity_ops} instead of always using all"""
    cutmix_p: float = 0.5
    """probability of a CutMix box (or a Cutout rectangle) per sample"""
    mix_area: tuple[float, float] = (0.02, 0.4)
    """CutMix / Cutout rectangle area as a fraction of the crop"""
    mix_ratio: tuple[float, float] = (0.3, 1 / 0.3)
    """CutMix / Cutout rectangle aspect ratio range"""

    def __post_init__(self):
        for name in ("jitter_p", "grayscale_p", "blur_p", "cutmix_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if min(self.brightness, self.contrast, self.saturation) < 0 or not 0 <= self.hue <= 0.5:
            raise ValueError("brightness, contrast and saturation must be >= 0 and hue in [0, 0.5]")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}")
        if not 0 < self.mix_area[0] <= self.mix_area[1] <= 1 or not 0 < self.mix_ratio[0] <= self.mix_ratio[1]:
            raise ValueError(f"bad mix_area {self.mix_area} or mix_ratio {self.mix_ratio}")
        if self.intensity_ops < 0:
            raise ValueError(f"intensity_ops must be >= 0, got {self.intensity_ops}")


def fp32(fn: Callable) -> Callable:
    """Runs `fn(x, ...)` with autocast off on x's device: views are the same images in fp32 and bf16 training."""

    @functools.wraps(fn)
    def wrapped(x: torch.Tensor, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, *args, **kwargs)

    return wrapped


def _work(x: torch.Tensor) -> torch.Tensor:
    """A float32 copy in [0, 1] that the in-place ops may overwrite."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float().div_(255)
    if not x.is_floating_point():
        raise TypeError(f"expected uint8 or float images, got {x.dtype}")
    return x.to(torch.float32, copy=True)


def _back(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dtype == torch.uint8:
        return y.mul(255).round_().clamp_(0, 255).to(torch.uint8)
    return y.to(like.dtype)


def _per_sample(v: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _coin(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p


def _apply_(y: torch.Tensor, chosen: torch.Tensor, fn: Callable, *params: torch.Tensor) -> None:
    """y[chosen] = fn(y[chosen], *params[chosen]) in place; `chosen` and `params` are CPU tensors (B,)."""
    # selecting on the CPU keeps the device free of host syncs (no nonzero() on the device)
    idx = chosen.nonzero().flatten()
    if idx.numel() == 0:
        return
    idx_dev = idx.to(y.device)
    y.index_copy_(0, idx_dev, fn(y.index_select(0, idx_dev), *(p[idx].to(y.device) for p in params)))


def luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) ITU-R 601 luma."""
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, H, W) luma replicated to three channels."""
    return luma(x).repeat(1, 3, 1, 1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    f = _per_sample(factor, x)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """x * factor, clamped; factor (B,) or scalar."""
    return (x * _per_sample(factor, x)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend with the image's mean luma (torchvision / PIL ImageEnhance.Contrast)."""
    return _blend(x, luma(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend with the luma image (torchvision / PIL ImageEnhance.Color)."""
    return _blend(x, luma(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor | float) -> torch.Tensor:
    """Rotate the hue by `shift` turns (in [-0.5, 0.5]): RGB -> HSV, h += shift, HSV -> RGB (torchvision)."""
    maxc, minc = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    delta = maxc - minc
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    # gray pixels have delta = 0 and equal channels, so any finite 1 / delta gives them hue 0
    inv = delta.clamp(min=1e-12).reciprocal_()
    # hue in sixths of a turn; a rotation keeps the value (max) and the chroma (max - min) unchanged
    h6 = torch.where(maxc == r, (g - b) * inv, torch.where(maxc == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0))
    h6 += 6.0 * _per_sample(shift, x)
    # closed form of HSV -> RGB: channel n in (R, G, B) uses k = (n + 6h) mod 6 with n = 5, 3, 1
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (n + h6).remainder_(6.0)
    return maxc - delta * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def adjust_sharpness(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend with PIL's SMOOTH-filtered image (borders kept), as ImageEnhance.Sharpness."""
    if x.shape[-2] < 3 or x.shape[-1] < 3:
        return x.clone()
    kernel = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(x, kernel, groups=3)
    return _blend(x, smooth, factor)


@fp32
def blur(x: torch.Tensor, sigma: torch.Tensor | float, radius: int) -> torch.Tensor:
    """Gaussian blur with per-sample sigma (B,): separable depthwise conv, reflect padding, kernel 2 * radius + 1."""
    b, c, h, w = x.shape
    # reflect padding needs pad < size; tiny images get a shorter kernel
    radius = min(radius, h - 1, w - 1)
    if radius <= 0:
        return x.clone()
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    sigma = _per_sample(sigma, x).view(-1, 1).expand(b, 1)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)


def _levels(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255).round_().clamp_(0, 255).long()


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image to [0, 1] (PIL ImageOps.autocontrast, cutoff 0)."""
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    flat = hi <= lo
    scale = 1.0 / torch.where(flat, torch.ones_like(hi), hi - lo)
    return torch.where(flat, x, (x - lo) * scale).clamp_(0, 1)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel histogram equalization on 256 levels (PIL ImageOps.equalize)."""
    b, c, h, w = x.shape
    q = _levels(x).view(b * c, h * w)
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, q, torch.ones_like(q))
    # PIL leaves out the count of the highest level present when computing the step
    last = hist.gather(1, q.amax(1, keepdim=True))
    step = (hist.sum(1, keepdim=True) - last) // 255
    lut = (hist.cumsum(1) + step // 2) // step.clamp(min=1)
    lut = F.pad(lut, (1, 0))[:, :-1].clamp_(0, 255)
    out = torch.where(step > 0, lut.gather(1, q), q)
    return out.view(b, c, h, w).to(x.dtype) / 255


def posterize(x: torch.Tensor, bits: torch.Tensor | int) -> torch.Tensor:
    """Keep the top `bits` (B,) bits of each 8-bit level (PIL ImageOps.posterize)."""
    q = _levels(x)
    unit = torch.as_tensor(bits, device=x.device).long().reshape(-1, 1, 1, 1).neg().add(8).exp2()
    return torch.div(q, unit, rounding_mode="floor").mul(unit).to(x.dtype) / 255


def solarize(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Invert values >= threshold/255, threshold (B,) in 8-bit levels (PIL ImageOps.solarize)."""
    t = _per_sample(threshold, x) / 255
    return torch.where(x >= t, 1 - x, x)


def _color_jitter_(y, gen, brightness, contrast, saturation, hue, p):
    if min(brightness, contrast, saturation) < 0 or not 0 <= hue <= 0.5:
        raise ValueError("brightness, contrast and saturation must be >= 0 and hue in [0, 0.5]")
    n = y.shape[0]
    apply = _coin(n, p, gen)
    order = torch.rand(n, 4, generator=gen).argsort(dim=1)
    factors = (
        _uniform(n, max(0.0, 1 - brightness), 1 + brightness, gen),
        _uniform(n, max(0.0, 1 - contrast), 1 + contrast, gen),
        _uniform(n, max(0.0, 1 - saturation), 1 + saturation, gen),
        _uniform(n, -hue, hue, gen),
    )
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    # like torchvision, an op with a zero range is skipped, so all-zero ranges are the identity
    active = (brightness > 0, contrast > 0, saturation > 0, hue > 0)
    for step in range(4):
        for j in range(4):
            if active[j]:
                _apply_(y, apply & (order[:, step] == j), ops[j], factors[j])


def _grayscale_(y, gen, p):
    _apply_(y, _coin(y.shape[0], p, gen), grayscale)


def _gaussian_blur_(y, gen, sigma, p):
    if not 0 < sigma[0] <= sigma[1]:
        raise ValueError(f"sigma must satisfy 0 < lo <= hi, got {sigma}")
    n = y.shape[0]
    apply = _coin(n, p, gen)
    s = _uniform(n, sigma[0], sigma[1], gen)
    radius = math.ceil(3 * sigma[1])
    _apply_(y, apply, lambda z, v: blur(z, v, radius), s)


@fp32
def color_jitter(
    x: torch.Tensor,
    gen: torch.Generator,
    brightness: float = 0.5,
    contrast: float = 0.5,
    saturation: float = 0.5,
    hue: float = 0.25,
    p: float = 0.8,
) -> torch.Tensor:
    """torchvision ColorJitter per sample with probability p: four ops in a random order per sample."""
    y = _work(x)
    _color_jitter_(y, gen, brightness, contrast, saturation, hue, p)
    return _back(y, x)


@fp32
def random_grayscale(x: torch.Tensor, gen: torch.Generator, p: float = 0.2) -> torch.Tensor:
    """Luma replicated to three channels, per sample with probability p."""
    y = _work(x)
    _grayscale_(y, gen, p)
    return _back(y, x)


@fp32
def gaussian_blur(
    x: torch.Tensor, gen: torch.Generator, sigma: tuple[float, float] = (0.1, 2.0), p: float = 0.5
) -> torch.Tensor:
    """Gaussian blur with sigma ~ U(sigma) per sample with probability p; kernel radius ceil(3 * sigma max)."""
    y = _work(x)
    _gaussian_blur_(y, gen, sigma, p)
    return _back(y, x)


INTENSITY_OPS = (
    "identity",
    "autocontrast",
    "equalize",
    "blur",
    "contrast",
    "brightness",
    "color",
    "sharpness",
    "posterize",
    "solarize",
    "hue",
)
"""AugSeg's operation list (DSSN 4(c)), in its order"""

_ENHANCE = (0.05, 0.95)
_INTENSITY_KERNELS: dict[str, Callable] = {
    "autocontrast": lambda z, v: autocontrast(z),
    "equalize": lambda z, v: equalize(z),
    "blur": lambda z, v: blur(z, v, math.ceil(3 * 2.0)),
    "contrast": adjust_contrast,
    "brightness": adjust_brightness,
    "color": adjust_saturation,
    "sharpness": adjust_sharpness,
    "posterize": posterize,
    "solarize": solarize,
    "hue": adjust_hue,
}


def _intensity_params(u: torch.Tensor, sign: torch.Tensor) -> dict[str, torch.Tensor]:
    """AugSeg's mapping of a uniform draw u to each op's parameter (same ranges and roundings)."""
    lo, hi = _ENHANCE
    enhance = hi - (hi - lo) * u
    return {
        "autocontrast": u,
        "equalize": u,
        "blur": 0.1 + 1.9 * u,
        "contrast": enhance,
        "brightness": enhance,
        "color": enhance,
        "sharpness": enhance,
        # AugSeg: bits = 8 - max(1, ceil(4u)) in {4..7}; threshold = 256 - max(1, ceil(255u)) in {1..255}
        "posterize": 8 - (4 * u).ceil().clamp(min=1),
        "solarize": 256 - (255 * u).ceil().clamp(min=1),
        "hue": sign * 0.5 * u,
    }


def _random_intensity_(y, gen, max_ops, random_num):
    if max_ops < 1:
        raise ValueError(f"max_ops must be >= 1, got {max_ops}")
    n = y.shape[0]
    if random_num:
        num = torch.randint(1, max_ops + 1, (n,), generator=gen)
    else:
        num = torch.full((n,), max_ops)
    ops = torch.randint(0, len(INTENSITY_OPS), (n, max_ops), generator=gen)
    u = torch.rand(n, max_ops, generator=gen)
    sign = torch.where(torch.rand(n, max_ops, generator=gen) < 0.5, -1.0, 1.0)
    params = _intensity_params(u, sign)
    for k in range(max_ops):
        for j, name in enumerate(INTENSITY_OPS[1:], start=1):
            _apply_(y, (k < num) & (ops[:, k] == j), _INTENSITY_KERNELS[name], params[name][:, k])


@fp32
def random_intensity(x: torch.Tensor, gen: torch.Generator, max_ops: int = 3, random_num: bool = True) -> torch.Tensor:
    """AugSeg random intensity: k ~ U{1..max_ops} ops per sample, drawn with replacement from INTENSITY_OPS."""
    y = _work(x)
    _random_intensity_(y, gen, max_ops, random_num)
    return _back(y, x)


@fp32
def strong_view(x: torch.Tensor, gen: torch.Generator, cfg: StrongAugConfig | None = None) -> torch.Tensor:
    """Colour jitter -> grayscale -> blur (UniMatch order), then the optional DSSN intensity ops; (B, 3, H, W)."""
    cfg = cfg or StrongAugConfig()
    y = _work(x)
    _color_jitter_(y, gen, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, cfg.jitter_p)
    _grayscale_(y, gen, cfg.grayscale_p)
    _gaussian_blur_(y, gen, cfg.blur_sigma, cfg.blur_p)
    if cfg.intensity_ops:
        _random_intensity_(y, gen, cfg.intensity_ops, cfg.intensity_random_num)
    return _back(y, x)


def _boxes(
    n: int,
    h: int,
    w: int,
    gen: torch.Generator,
    area: tuple[float, float],
    ratio: tuple[float, float],
    redraw_area: bool,
    tries: int = 16,
) -> torch.Tensor:
    """One rectangle per sample that fits in (h, w), as long (n, 4): top, left, height, width.

    Candidates are drawn until one fits, as UniMatch (area drawn once, redraw_area=False) and ST++'s
    Cutout (area redrawn every try) do; `tries` candidates per sample per round keep the loop short.
    """
    if not 0 < area[0] <= area[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"bad box area {area} or ratio {ratio}")
    size = _uniform(n, area[0], area[1], gen) * (h * w)
    out = torch.zeros(n, 4, dtype=torch.long)
    todo = torch.arange(n)
    for _ in range(1000):
        if todo.numel() == 0:
            return out
        k = todo.numel()
        s = _uniform(k * tries, area[0], area[1], gen).view(k, tries) * (h * w) if redraw_area else size[todo, None]
        r = _uniform(k * tries, ratio[0], ratio[1], gen).view(k, tries)
        bw = (s / r).sqrt().long().clamp_(min=1)
        bh = (s * r).sqrt().long().clamp_(min=1)
        x0 = torch.randint(0, w, (k, tries), generator=gen)
        y0 = torch.randint(0, h, (k, tries), generator=gen)
        ok = (x0 + bw <= w) & (y0 + bh <= h)
        first = ok.int().argmax(dim=1, keepdim=True)
        found = ok.any(dim=1)
        cand = torch.stack([y0, x0, bh, bw], dim=2).gather(1, first[:, :, None].expand(k, 1, 4))[:, 0]
        out[todo[found]] = cand[found]
        todo = todo[~found]
    raise ValueError(f"no box of area {area} and ratio {ratio} fits in {h}x{w}")


def _box_mask(boxes: torch.Tensor, h: int, w: int, device: torch.device | str | None) -> torch.Tensor:
    b = boxes.to(device)
    ys = torch.arange(h, device=device).view(1, h, 1)
    xs = torch.arange(w, device=device).view(1, 1, w)
    top, left, bh, bw = (b[:, i].view(-1, 1, 1) for i in range(4))
    return (ys >= top) & (ys < top + bh) & (xs >= left) & (xs < left + bw)


def cutmix_box(
    n: int,
    h: int,
    w: int,
    gen: torch.Generator,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """UniMatch CutMix boxes: bool (n, h, w), one rectangle per sample with probability p, else all False."""
    apply = _coin(n, p, gen)
    boxes = _boxes(n, h, w, gen, area, ratio, redraw_area=False)
    boxes[~apply, 2:] = 0
    return _box_mask(boxes, h, w, device)


def mix(a: torch.Tensor, b: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """`a` with `b` pasted where box (B, H, W) is set; a, b: images (B, C, H, W) or maps (B, H, W)."""
    if a.shape != b.shape or a.shape[0] != box.shape[0] or a.shape[-2:] != box.shape[-2:]:
        raise ValueError(f"mix: shapes {tuple(a.shape)}, {tuple(b.shape)} and box {tuple(box.shape)} do not match")
    m = box.bool().view(box.shape[0], *([1] * (a.dim() - 3)), *box.shape[-2:])
    return torch.where(m, b, a)


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for x < 2**32 without overflowing int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash (C. Wellons): identical on every device, unlike device RNG streams."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _noise(seed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform [0, 1) float32 noise of `shape`, a pure function of the per-sample seeds (B,)."""
    idx = _hash32(torch.arange(math.prod(shape[1:]), device=seed.device))
    v = _hash32(idx.view(1, -1) ^ seed.view(-1, 1))
    return (v >> 8).float().mul_(2.0**-24).view(shape)


def cutout(
    x: torch.Tensor,
    mask: torch.Tensor,
    gen: torch.Generator,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
) -> tuple[torch.Tensor, torch.Tensor]:
    """ST++ Cutout: per sample with probability p, a rectangle of per-pixel uniform noise; mask IGNORE there."""
    n, _, h, w = x.shape
    apply = _coin(n, p, gen)
    boxes = _boxes(n, h, w, gen, area, ratio, redraw_area=True)
    boxes[~apply, 2:] = 0
    seed = torch.randint(0, 2**32, (n,), generator=gen)
    box = _box_mask(boxes, h, w, x.device)
    y = torch.where(box[:, None], _noise(seed.to(x.device), (n, 3, h, w)), _work(x))
    return _back(y, x), mask.masked_fill(box, IGNORE)


def classmix_mask(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """ClassMix: bool (B, H, W), per image the pixels of floor(n/2) of its n present classes (IGNORE excluded).

    labels: integer (B, H, W) in [0, 255].
    """
    n = labels.shape[0]
    flat = labels.reshape(n, -1).long()
    present = torch.zeros(n, 256, dtype=torch.bool, device=labels.device).scatter_(1, flat, True)
    present[:, IGNORE] = False
    # k smallest random scores among the present classes = a uniform random k-subset, without a host sync
    score = torch.rand(n, 256, generator=gen).to(labels.device).masked_fill(~present, 2.0)
    rank = score.argsort(dim=1).argsort(dim=1)
    chosen = rank < present.sum(dim=1, keepdim=True) // 2
    return chosen.gather(1, flat).view(labels.shape)


MIX_MASKS = ("classmix", "cutmix", "none")


def mix_mask(kind: str, labels: torch.Tensor, gen: torch.Generator, cfg: StrongAugConfig) -> torch.Tensor:
    """bool (B, H, W), True where a mixed view keeps the image itself: ClassMix of labels (B, H, W), the complement
    of a CutMix box (cfg's probability, area and ratio), or everywhere (none)."""
    b, h, w = labels.shape
    if kind == "classmix":
        return classmix_mask(labels, gen)
    if kind == "cutmix":
        return ~cutmix_box(b, h, w, gen, cfg.cutmix_p, cfg.mix_area, cfg.mix_ratio, labels.device)
    if kind == "none":
        return torch.ones_like(labels, dtype=torch.bool)
    raise ValueError(f"mix mask kind must be one of {', '.join(MIX_MASKS)}, got {kind!r}")
