"""Strong batched augmentation: shapes, per-sample randomness, determinism, coins and hand-checked values."""

import colorsys
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from semiseg.data import augment as A
from semiseg.data.info import IGNORE


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 6, h: int = 12, w: int = 14, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    x = torch.rand(n, 3, h, w, generator=gen(seed + 100))
    return (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)


RANDOM_OPS = {
    "color_jitter": lambda x, g, p: A.color_jitter(x, g, p=p),
    "random_grayscale": lambda x, g, p: A.random_grayscale(x, g, p=p),
    "gaussian_blur": lambda x, g, p: A.gaussian_blur(x, g, p=p),
    "strong_view": lambda x, g, p: A.strong_view(
        x, g, A.StrongAugConfig(jitter_p=p, grayscale_p=p, blur_p=p, intensity_ops=3 if p else 0)
    ),
    "cutout": lambda x, g, p: A.cutout(x, torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.long), g, p=p)[0],
}


@pytest.mark.parametrize("name", RANDOM_OPS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_ops_keep_shape_dtype_and_range(name, dtype):
    x = images(dtype=dtype)
    y = RANDOM_OPS[name](x, gen(), 1.0)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert y.min() >= 0 and y.max() <= (255 if dtype == torch.uint8 else 1)


@pytest.mark.parametrize("name", RANDOM_OPS)
def test_p0_is_identity_and_p1_changes_every_sample(name):
    x = images()
    assert torch.equal(RANDOM_OPS[name](x, gen(), 0.0), x)
    y = RANDOM_OPS[name](x, gen(), 1.0)
    assert ((y - x).abs().amax(dim=(1, 2, 3)) > 1e-3).all()
    x8 = images(dtype=torch.uint8)
    assert torch.equal(RANDOM_OPS[name](x8, gen(), 0.0), x8)


@pytest.mark.parametrize("name", RANDOM_OPS)
def test_deterministic_under_a_seed_and_input_not_modified(name):
    x = images(n=8)
    before = x.clone()
    a = RANDOM_OPS[name](x, gen(3), 0.5)
    b = RANDOM_OPS[name](x, gen(3), 0.5)
    c = RANDOM_OPS[name](x, gen(4), 0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x, before)


@pytest.mark.parametrize("name", ["color_jitter", "random_grayscale", "gaussian_blur", "cutout"])
def test_samples_whose_coin_says_no_are_untouched(name):
    x = images(n=32)
    if name == "gaussian_blur":  # sigma 0.1 is a near-delta kernel: too small a change to tell apart
        y = A.gaussian_blur(x, gen(1), sigma=(1.0, 2.0), p=0.5)
    else:
        y = RANDOM_OPS[name](x, gen(1), 0.5)
    same = (y == x).flatten(1).all(dim=1)
    changed = (y - x).abs().flatten(1).amax(dim=1) > 1e-4
    assert (same | changed).all()  # a sample is either bit-identical or visibly changed
    assert 4 <= int(same.sum()) <= 28


def test_color_jitter_uses_different_parameters_per_sample():
    x = images(n=1).expand(8, -1, -1, -1).contiguous()
    y = A.color_jitter(x, gen(), p=1.0)
    flat = y.flatten(1)
    assert all(not torch.allclose(flat[i], flat[j]) for i in range(8) for j in range(i + 1, 8))


def test_blur_uses_different_sigmas_per_sample():
    x = images(n=1, h=20, w=20).expand(6, -1, -1, -1).contiguous()
    y = A.gaussian_blur(x, gen(), p=1.0)
    energy = (y[:, :, 1:] - y[:, :, :-1]).abs().mean(dim=(1, 2, 3))
    assert len(set(energy.tolist())) == 6


def test_color_jitter_with_zero_ranges_is_identity():
    x = images()
    y = A.color_jitter(x, gen(), brightness=0, contrast=0, saturation=0, hue=0, p=1.0)
    assert torch.equal(y, x)


def test_color_jitter_factor_ranges():
    x = torch.full((64, 3, 4, 4), 0.5)
    y = A.color_jitter(x, gen(), brightness=0.5, contrast=0, saturation=0, hue=0, p=1.0)
    factors = y[:, 0, 0, 0] / 0.5
    assert factors.min() >= 0.5 and factors.max() <= 1.5
    assert factors.min() < 0.6 and factors.max() > 1.4


def test_adjust_ops_hand_values():
    x = torch.tensor([0.2, 0.4, 0.8]).view(1, 3, 1, 1).repeat(1, 1, 2, 2)
    torch.testing.assert_close(A.adjust_brightness(x, 0.5), x * 0.5)
    torch.testing.assert_close(A.adjust_brightness(x, 2.0), torch.tensor([0.4, 0.8, 1.0]).view(1, 3, 1, 1).expand_as(x))
    gray = 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.8
    torch.testing.assert_close(A.adjust_saturation(x, 0.0), torch.full_like(x, gray))
    torch.testing.assert_close(A.adjust_contrast(x, 0.0), torch.full_like(x, gray))
    torch.testing.assert_close(A.adjust_contrast(x, 1.0), x)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(A.adjust_hue(red, 1 / 3), torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1))
    torch.testing.assert_close(A.adjust_hue(red, -1 / 3), torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1))


def test_adjust_hue_matches_colorsys():
    x = images(n=2, h=5, w=5)
    x[0, :, 0, 0] = 0.3  # gray: hue undefined, must stay gray
    shifts = torch.tensor([0.37, -0.21])
    y = A.adjust_hue(x, shifts)
    for b in range(2):
        for i in range(5):
            for j in range(5):
                h, s, v = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
                expected = colorsys.hsv_to_rgb((h + shifts[b].item()) % 1.0, s, v)
                torch.testing.assert_close(y[b, :, i, j], torch.tensor(expected, dtype=torch.float32))
    torch.testing.assert_close(A.adjust_hue(x, 0.0), x)


def test_grayscale_has_equal_channels_with_601_luma():
    x = images()
    y = A.random_grayscale(x, gen(), p=1.0)
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    torch.testing.assert_close(y[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])
    x8 = images(dtype=torch.uint8)
    y8 = A.random_grayscale(x8, gen(), p=1.0)
    pil = np.asarray(Image.fromarray(x8[0].permute(1, 2, 0).numpy()).convert("L")).astype(int)
    assert np.abs(y8[0, 0].numpy().astype(int) - pil).max() <= 1


def test_gaussian_blur_of_constant_image_is_constant():
    x = torch.full((4, 3, 16, 16), 0.6)
    y = A.gaussian_blur(x, gen(), p=1.0)
    torch.testing.assert_close(y, x)


def test_blur_kernel_is_the_sampled_gaussian():
    x = torch.zeros(1, 3, 21, 21)
    x[..., 10, 10] = 1.0
    sigma = 1.5
    y = A.blur(x, torch.tensor([sigma]), radius=5)
    t = torch.arange(-5, 6, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    torch.testing.assert_close(y[0, 1, 5:16, 5:16], torch.outer(k, k))
    assert y[0, 1, :5].abs().max() == 0


@pytest.mark.parametrize("sigma", [1.0, 1.5, 2.0])
def test_blur_is_close_to_pil_gaussian_blur(sigma):
    src = (torch.rand(40, 40, 3, generator=gen(5)) * 255).round().to(torch.uint8).numpy()
    ours = A.blur(torch.from_numpy(src).permute(2, 0, 1)[None].float() / 255, torch.tensor([sigma]), radius=6)
    pil = np.asarray(Image.fromarray(src).filter(ImageFilter.GaussianBlur(radius=sigma))).astype(np.float32) / 255
    inner = (slice(8, -8), slice(8, -8))  # borders differ: PIL extends edges, we reflect
    diff = np.abs(ours[0].permute(1, 2, 0).numpy()[inner] - pil[inner])
    assert diff.max() < 0.02 and diff.mean() < 0.005  # the blur itself moves pixels by ~0.2 on average


def test_blur_handles_images_smaller_than_the_kernel():
    x = images(n=2, h=3, w=4)
    y = A.gaussian_blur(x, gen(), p=1.0)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_cutmix_boxes_are_single_rectangles_within_area_bounds():
    n, h, w = 64, 40, 50
    box = A.cutmix_box(n, h, w, gen(), p=1.0)
    assert box.shape == (n, h, w) and box.dtype == torch.bool
    areas = box.flatten(1).sum(1).float() / (h * w)
    assert areas.min() > 0 and areas.max() <= 0.4
    assert (areas >= 0.01).float().mean() > 0.9  # the 2% lower bound, minus integer truncation
    for b in box:
        rows, cols = b.any(1).nonzero().flatten(), b.any(0).nonzero().flatten()
        rect = torch.zeros_like(b)
        rect[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        assert torch.equal(b, rect)
    assert not A.cutmix_box(n, h, w, gen(), p=0.0).any()
    half = A.cutmix_box(n, h, w, gen(), p=0.5).flatten(1).any(1)
    assert 16 < int(half.sum()) < 48
    assert torch.equal(A.cutmix_box(n, h, w, gen(7)), A.cutmix_box(n, h, w, gen(7)))


def test_box_mask_covers_exactly_the_box():
    boxes = torch.tensor([[1, 2, 3, 4], [0, 0, 0, 0]])  # top, left, height, width
    m = A._box_mask(boxes, 6, 7, "cpu")
    expected = torch.zeros(2, 6, 7, dtype=torch.bool)
    expected[0, 1:4, 2:6] = True
    assert torch.equal(m, expected)


def test_cutmix_box_rectangular_crop_and_bad_area():
    box = A.cutmix_box(16, 20, 60, gen(), p=1.0)
    assert box.flatten(1).any(1).all() and box.shape == (16, 20, 60)
    with pytest.raises(ValueError, match="area"):
        A.cutmix_box(2, 10, 10, gen(), area=(0.5, 1.5))


def test_mix_pastes_exactly_inside_the_box_for_every_kind_of_map():
    box = torch.zeros(2, 4, 5, dtype=torch.bool)
    box[0, 1:3, 2:4] = True
    inside = box[:, None].expand(2, 3, 4, 5)
    x_a, x_b = torch.zeros(2, 3, 4, 5), torch.ones(2, 3, 4, 5)
    torch.testing.assert_close(A.mix(x_a, x_b, box), inside.float())
    labels_a, labels_b = torch.full((2, 4, 5), 3), torch.full((2, 4, 5), 9)
    assert torch.equal(A.mix(labels_a, labels_b, box), torch.where(box, 9, 3))
    conf_a, conf_b = torch.full((2, 4, 5), 0.25), torch.full((2, 4, 5), 0.75)
    assert torch.equal(A.mix(conf_a, conf_b, box), torch.where(box, 0.75, 0.25))
    pad_a, pad_b = torch.zeros(2, 4, 5, dtype=torch.bool), torch.ones(2, 4, 5, dtype=torch.bool)
    assert torch.equal(A.mix(pad_a, pad_b, box), box)
    assert torch.equal(A.mix(labels_a, labels_b, box.float()), torch.where(box, 9, 3))
    with pytest.raises(ValueError, match="mix"):
        A.mix(x_a, x_b, box[:, :3])


def test_cutout_sets_mask_ignore_exactly_inside_its_rectangle():
    x = images(n=16, h=30, w=30)
    mask = torch.randint(0, 5, (16, 30, 30))
    y, m = A.cutout(x, mask, gen(), p=1.0)
    inside = m == IGNORE
    assert inside.flatten(1).any(1).all()
    assert torch.equal(m[~inside], mask[~inside])
    assert torch.equal(y.permute(0, 2, 3, 1)[~inside], x.permute(0, 2, 3, 1)[~inside])
    assert (y.permute(0, 2, 3, 1)[inside] != x.permute(0, 2, 3, 1)[inside]).float().mean() > 0.99
    for b in inside:
        rows, cols = b.any(1).nonzero().flatten(), b.any(0).nonzero().flatten()
        assert int(b.sum()) == len(rows) * len(cols) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    noise = y.permute(0, 2, 3, 1)[inside]
    assert 0.4 < noise.mean() < 0.6 and noise.min() >= 0 and noise.max() < 1
    assert torch.equal(A.cutout(x, mask, gen(), p=0.0)[1], mask)


def test_classmix_picks_half_the_present_classes_never_ignore():
    labels = torch.zeros(3, 6, 6, dtype=torch.long)
    labels[0, :2] = 3
    labels[0, 2:4] = 7
    labels[0, 4:] = IGNORE  # classes {0?, 3, 7}: 0 is absent here
    labels[1] = torch.arange(36).view(6, 6) % 5  # classes 0..4 -> 2 chosen
    labels[2] = IGNORE
    for seed in range(20):
        mask = A.classmix_mask(labels, gen(seed))
        assert mask.shape == labels.shape and mask.dtype == torch.bool
        assert not mask[labels == IGNORE].any()
        for b, n_present in [(0, 2), (1, 5), (2, 0)]:
            chosen = set(labels[b][mask[b]].tolist())
            assert len(chosen) == n_present // 2
            for c in chosen:  # whole classes: every pixel of a chosen class is in the mask
                assert mask[b][labels[b] == c].all()
    picks = {tuple(sorted(set(labels[1][A.classmix_mask(labels, gen(s))[1]].tolist()))) for s in range(40)}
    assert len(picks) > 5


def test_posterize_solarize_equalize_autocontrast_match_pil():
    x8 = images(n=2, h=32, w=33, dtype=torch.uint8)  # > 255 pixels, else PIL's equalize is the identity
    x8[0] = x8[0] // 2 + 30  # an uneven histogram, so equalize moves levels
    x8[1, 2] = 40  # a constant channel: equalize/autocontrast leave it alone
    x = x8.float() / 255
    for b in range(2):
        pil = Image.fromarray(x8[b].permute(1, 2, 0).numpy())
        cases = {
            "posterize": (A.posterize(x[b : b + 1], torch.tensor([5])), ImageOps.posterize(pil, 5)),
            "solarize": (A.solarize(x[b : b + 1], torch.tensor([100.0])), ImageOps.solarize(pil, 100)),
            "equalize": (A.equalize(x[b : b + 1]), ImageOps.equalize(pil)),
            "autocontrast": (A.autocontrast(x[b : b + 1]), ImageOps.autocontrast(pil)),
        }
        for name, (ours, ref) in cases.items():
            ours8 = (ours[0] * 255).round().permute(1, 2, 0).numpy().astype(int)
            tol = 1 if name == "autocontrast" else 0  # PIL truncates its lookup table
            assert np.abs(ours8 - np.asarray(ref).astype(int)).max() <= tol, name


@pytest.mark.parametrize("name", ["brightness", "contrast", "color", "sharpness"])
def test_enhance_ops_match_pil_image_enhance(name):
    x8 = images(n=1, h=10, w=12, dtype=torch.uint8)
    pil = Image.fromarray(x8[0].permute(1, 2, 0).numpy())
    ops = {
        "brightness": (A.adjust_brightness, ImageEnhance.Brightness),
        "contrast": (A.adjust_contrast, ImageEnhance.Contrast),
        "color": (A.adjust_saturation, ImageEnhance.Color),
        "sharpness": (A.adjust_sharpness, ImageEnhance.Sharpness),
    }
    ours_fn, pil_cls = ops[name]
    ours = (ours_fn(x8.float() / 255, torch.tensor([0.3])) * 255).round()[0].permute(1, 2, 0).numpy()
    ref = np.asarray(pil_cls(pil).enhance(0.3)).astype(float)
    assert np.abs(ours - ref).max() <= 2


def test_random_intensity_draws_per_sample_op_lists():
    x = images(n=1, h=16, w=16).expand(12, -1, -1, -1).contiguous()
    y = A.random_intensity(x, gen(), max_ops=3)
    assert y.shape == x.shape and y.dtype == x.dtype and 0 <= y.min() and y.max() <= 1
    distinct = {tuple(v.flatten()[:50].tolist()) for v in y}
    assert len(distinct) >= 8
    assert torch.equal(y, A.random_intensity(x, gen(), max_ops=3))
    assert len(A.INTENSITY_OPS) == 11


def test_random_intensity_parameter_ranges_follow_augseg():
    u = torch.tensor([0.0, 1e-6, 0.25, 0.5, 0.999999, 1.0])
    params = A._intensity_params(u, torch.ones_like(u))
    assert params["posterize"].tolist() == [7, 7, 7, 6, 4, 4]
    assert params["solarize"].min() >= 1 and params["solarize"].max() <= 255
    assert params["contrast"].min() >= 0.05 and params["contrast"].max() <= 0.95
    assert params["blur"].min() >= 0.1 and params["blur"].max() <= 2.0
    assert params["hue"].abs().max() <= 0.5


def test_strong_view_composition_and_config():
    x8 = images(n=8, dtype=torch.uint8)
    y = A.strong_view(x8, gen())
    assert y.dtype == torch.uint8 and y.shape == x8.shape
    assert torch.equal(y, A.strong_view(x8, gen()))
    assert not torch.equal(y, x8)
    off = A.StrongAugConfig(jitter_p=0, grayscale_p=0, blur_p=0)
    assert torch.equal(A.strong_view(x8, gen(), off), x8)
    gray = A.strong_view(x8, gen(), A.StrongAugConfig(jitter_p=0, grayscale_p=1, blur_p=0))
    assert torch.equal(gray[:, 0], gray[:, 1])
    with pytest.raises(ValueError, match="jitter_p"):
        A.StrongAugConfig(jitter_p=1.5)
    with pytest.raises(ValueError, match="hue"):
        A.StrongAugConfig(hue=0.7)


def test_noise_hash_is_uniform_and_seeded():
    seed = torch.tensor([1, 2], dtype=torch.long)
    a = A._noise(seed, (2, 3, 64, 64))
    assert torch.equal(a, A._noise(seed, (2, 3, 64, 64)))
    assert not torch.equal(a[0], a[1])
    hist = torch.histc(a, bins=10, min=0, max=1) / a.numel()
    assert (hist - 0.1).abs().max() < 0.01
    assert math.isclose(float(a.mean()), 0.5, abs_tol=0.01)


def test_ops_reject_bad_shapes():
    with pytest.raises(ValueError, match="B, 3, H, W"):
        A.color_jitter(torch.rand(3, 8, 8), gen())
    with pytest.raises(TypeError, match="uint8 or float"):
        A.gaussian_blur(torch.zeros(1, 3, 8, 8, dtype=torch.long), gen())
