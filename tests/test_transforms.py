"""Weak joint transforms: the mask and the pad map stay aligned with the image under every op."""

import numpy as np
import pytest

from semiseg.data.info import IGNORE
from semiseg.data.transforms import (
    hflip,
    pad_to,
    random_crop,
    rescale,
    resize,
    weak_transform,
)
from semiseg.errors import DataError


def coord_image(h: int, w: int) -> np.ndarray:
    """R = x, G = y, B = 7: every pixel names its own source coordinates."""
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs, ys, np.full_like(xs, 7)], axis=2).astype(np.uint8)


def coord_mask(h: int, w: int) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    return label_of(xs, ys)


def label_of(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    return ((xs * 7 + ys * 13) % 250).astype(np.uint8)


def blank(h: int, w: int) -> np.ndarray:
    return np.zeros((h, w), dtype=bool)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("hw", [(40, 60), (60, 40), (20, 30)])
def test_weak_transform_keeps_image_and_mask_aligned_without_rescale(seed, hw):
    h, w = hw
    image, mask, pad = weak_transform(coord_image(h, w), coord_mask(h, w), np.random.default_rng(seed), 32, (1, 1))
    assert image.shape == (32, 32, 3) and mask.shape == (32, 32) and pad.shape == (32, 32)
    assert image.dtype == np.uint8 and mask.dtype == np.uint8 and pad.dtype == bool
    valid = ~pad
    xs, ys = image[..., 0].astype(int), image[..., 1].astype(int)
    np.testing.assert_array_equal(mask[valid], label_of(xs, ys)[valid])
    assert (image[..., 2][valid] == 7).all()
    # padding: image 0, mask IGNORE, and exactly the pixels that came from no source pixel
    assert (mask[pad] == IGNORE).all() and (image[pad] == 0).all()
    assert valid.sum() == min(h, 32) * min(w, 32)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("axis", [0, 1])
def test_weak_transform_keeps_alignment_under_rescale(seed, axis):
    h, w = 50, 70
    ys, xs = np.mgrid[0:h, 0:w]
    coord = (xs if axis == 0 else ys).astype(np.uint8)
    image, mask, pad = weak_transform(coord_image(h, w), coord, np.random.default_rng(seed), 48, (0.5, 2.0))
    valid = ~pad
    # bilinear (image) and nearest (mask) sample the same place up to one source pixel
    diff = np.abs(image[..., axis].astype(int) - mask.astype(int))[valid]
    assert diff.max() <= 1
    assert (mask[pad] == IGNORE).all()


def test_unlabeled_mask_is_ignore_everywhere_and_pad_marks_padding():
    image, mask, pad = weak_transform(coord_image(10, 20), None, np.random.default_rng(0), (16, 24), (1, 1))
    assert mask.shape == (16, 24) and (mask == IGNORE).all()
    assert pad.sum() == 16 * 24 - 10 * 20
    assert (image[pad] == 0).all()


def test_crop_size_is_exact_for_square_and_rectangular_crops():
    rng = np.random.default_rng(1)
    for h, w in [(5, 7), (100, 30), (33, 33), (200, 300)]:
        for crop in [17, (12, 40)]:
            image, mask, pad = weak_transform(coord_image(h, w), coord_mask(h, w), rng, crop)
            ch, cw = (crop, crop) if isinstance(crop, int) else crop
            assert image.shape == (ch, cw, 3) and mask.shape == (ch, cw) and pad.shape == (ch, cw)
            assert image.flags.c_contiguous and mask.flags.c_contiguous


def test_pad_to_fills_bottom_right():
    image, mask, pad = pad_to(coord_image(3, 4), coord_mask(3, 4), blank(3, 4), (5, 6))
    assert image.shape == (5, 6, 3)
    np.testing.assert_array_equal(image[:3, :4], coord_image(3, 4))
    expected_pad = np.ones((5, 6), dtype=bool)
    expected_pad[:3, :4] = False
    np.testing.assert_array_equal(pad, expected_pad)
    assert (mask[expected_pad] == IGNORE).all() and (image[expected_pad] == 0).all()
    same = pad_to(coord_image(8, 8), coord_mask(8, 8), blank(8, 8), 4)
    assert same[0].shape == (8, 8, 3)


def test_hflip_flips_all_three_together():
    image, mask = coord_image(4, 5), coord_mask(4, 5)
    pad = blank(4, 5)
    pad[:, -1] = True
    fi, fm, fp = hflip(image, mask, pad, np.random.default_rng(0), p=1.0)
    np.testing.assert_array_equal(fi[:, 0, 0], [4, 4, 4, 4])
    np.testing.assert_array_equal(fi, image[:, ::-1])
    np.testing.assert_array_equal(fm, mask[:, ::-1])
    assert fp[:, 0].all() and not fp[:, 1:].any()
    same = hflip(image, mask, pad, np.random.default_rng(0), p=0.0)
    assert all(a is b for a, b in zip(same, (image, mask, pad)))


def test_weak_transform_flips_about_half_the_time():
    flips = 0
    for seed in range(200):
        image, _, _ = weak_transform(coord_image(20, 20), None, np.random.default_rng(seed), 20, (1, 1))
        flips += int(image[0, 0, 0] == 19)
    assert 70 < flips < 130


def test_random_crop_covers_valid_offsets_and_keeps_content():
    image, mask = coord_image(10, 12), coord_mask(10, 12)
    corners = set()
    for seed in range(300):
        ci, cm, cp = random_crop(image, mask, blank(10, 12), np.random.default_rng(seed), (4, 5))
        y0, x0 = int(ci[0, 0, 1]), int(ci[0, 0, 0])
        np.testing.assert_array_equal(ci, image[y0 : y0 + 4, x0 : x0 + 5])
        np.testing.assert_array_equal(cm, mask[y0 : y0 + 4, x0 : x0 + 5])
        assert not cp.any()
        corners.add((y0, x0))
    assert corners == {(y, x) for y in range(7) for x in range(8)}


@pytest.mark.parametrize("hw", [(50, 80), (80, 50)])
def test_rescale_respects_the_ratio_range_of_the_own_long_side(hw):
    h, w = hw
    sides = []
    for seed in range(100):
        image, mask, pad = rescale(coord_image(h, w), coord_mask(h, w), blank(h, w), np.random.default_rng(seed))
        nh, nw = mask.shape
        assert image.shape[:2] == (nh, nw) and pad.shape == (nh, nw) and not pad.any()
        assert 40 <= max(nh, nw) <= 160
        assert abs(min(nh, nw) - max(nh, nw) * min(h, w) / max(h, w)) <= 1
        assert (nh > nw) == (h > w)
        sides.append(max(nh, nw))
    assert min(sides) < 60 and max(sides) > 140


def test_rescale_relative_to_base_size():
    for seed in range(50):
        _, mask, _ = rescale(
            coord_image(30, 60), coord_mask(30, 60), blank(30, 60), np.random.default_rng(seed), (0.5, 2.0), 400
        )
        assert 200 <= mask.shape[1] <= 800
        assert abs(mask.shape[0] - mask.shape[1] / 2) <= 1


def test_resize_keeps_labels_nearest_and_image_bilinear():
    mask = np.array([[1, 2], [3, 4]], dtype=np.uint8)
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    image[0, 1] = 200
    ri, rm, rp = resize(image, mask, blank(2, 2), (4, 4))
    np.testing.assert_array_equal(rm, np.kron(mask, np.ones((2, 2), dtype=np.uint8)))
    assert set(np.unique(rm)) == {1, 2, 3, 4} and not rp.any()
    assert 0 < ri[0, 1, 0] < 200  # interpolated, not copied


def test_weak_transform_is_a_pure_function_of_the_rng():
    image, mask = coord_image(37, 53), coord_mask(37, 53)
    a = weak_transform(image, mask, np.random.default_rng(5), 32)
    b = weak_transform(image, mask, np.random.default_rng(5), 32)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    outs = {weak_transform(image, mask, np.random.default_rng(s), 32)[0].tobytes() for s in range(5)}
    assert len(outs) > 1


def test_weak_transform_rejects_bad_inputs():
    with pytest.raises(DataError, match="mask"):
        weak_transform(coord_image(10, 10), coord_mask(10, 11), np.random.default_rng(0), 8)
    with pytest.raises(DataError, match="RGB"):
        weak_transform(coord_mask(10, 10), None, np.random.default_rng(0), 8)
