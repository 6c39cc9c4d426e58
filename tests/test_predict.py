import numpy as np
import pytest
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from semiseg.data.info import DatasetInfo
from semiseg.errors import DataError
from semiseg.predict import colorize, list_images, overlay, predict_images

INFO = DatasetInfo(name="toy", classes=("a", "b", "c"), palette=((10, 20, 30), (200, 0, 0), (0, 250, 5)))


class RedClass(nn.Module):
    """Predicts class round(R / 40) from the un-normalised red channel and records input shapes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        red = x[:, 0] * 255  # models take [0, 1] images and normalise them themselves
        k = (red / 40).round().long().clamp(0, 2)
        return F.one_hot(k, 3).permute(0, 3, 1, 2).float()


def write_image(path, classes: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*classes.shape, 3)).astype(np.uint8)
    image[..., 0] = classes * 40
    Image.fromarray(image).save(path)
    return image


def test_colorize_and_overlay_hand_values():
    mask = np.array([[0, 1], [2, 7]], np.uint8)
    color = colorize(mask, INFO.palette)
    assert color.dtype == np.uint8 and color.shape == (2, 2, 3)
    assert color.tolist() == [[[10, 20, 30], [200, 0, 0]], [[0, 250, 5], [0, 0, 0]]]
    image = np.full((2, 2, 3), 100, np.uint8)
    assert overlay(image, color, 0.5)[0, 0].tolist() == [55, 60, 65]
    assert overlay(image, color, 0.25)[0, 1].tolist() == [125, 75, 75]


def test_predict_writes_index_color_and_overlay(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    maps = {"first.png": rng.integers(0, 3, (9, 14)), "second.bmp": rng.integers(0, 3, (16, 11))}
    images = {name: write_image(src / name, m.astype(np.uint8)) for name, m in maps.items()}
    (src / "notes.txt").write_text("not an image")
    paths = list_images(src)
    assert [p.name for p in paths] == ["first.png", "second.bmp"]

    out = tmp_path / "out"
    written = predict_images(RedClass(), paths, INFO, out, mode="auto", overlay_ext=".png")
    assert [p.name for p in written] == ["first.png", "second.png"]
    assert sorted(p.name for p in out.iterdir()) == [
        "first.png", "first_color.png", "first_overlay.png", "second.png", "second_color.png", "second_overlay.png",
    ]  # fmt: skip
    palette = np.array(INFO.palette, np.uint8)
    for name, classes in maps.items():
        stem = name.split(".")[0]
        index = Image.open(out / f"{stem}.png")
        assert index.mode == "P" and index.size == (classes.shape[1], classes.shape[0])
        np.testing.assert_array_equal(np.asarray(index), classes)
        color = np.asarray(Image.open(out / f"{stem}_color.png"))
        np.testing.assert_array_equal(color, palette[classes])
        blended = np.asarray(Image.open(out / f"{stem}_overlay.png"))
        expected = np.rint(0.5 * images[name].astype(np.float32) + 0.5 * palette[classes]).astype(np.uint8)
        np.testing.assert_array_equal(blended, expected)


def test_auto_mode_slides_over_large_images_only(tmp_path):
    small = tmp_path / "small.png"
    large = tmp_path / "large.png"
    write_image(small, np.zeros((20, 24), np.uint8))
    write_image(large, np.ones((40, 30), np.uint8))
    model = RedClass()
    predict_images(model, [small, large], INFO, tmp_path / "out", window=16, max_whole=32)
    assert model.seen[0] == (1, 3, 20, 24)
    assert model.seen[1:] and all(s[2:] == (16, 16) for s in model.seen[1:])
    overlay_jpg = Image.open(tmp_path / "out" / "large_overlay.jpg")
    assert overlay_jpg.format == "JPEG" and overlay_jpg.size == (30, 40)
    assert (np.asarray(Image.open(tmp_path / "out" / "large.png")) == 1).all()


def test_skip_existing_resumes_without_recomputing(tmp_path):
    path = tmp_path / "a.png"
    write_image(path, np.zeros((6, 6), np.uint8))
    predict_images(RedClass(), [path], INFO, tmp_path / "out")
    model = RedClass()
    predict_images(model, [path], INFO, tmp_path / "out", skip_existing=True)
    assert model.seen == []
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_unreadable_image_raises_data_error_naming_it(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG this is not really a png")
    with pytest.raises(DataError, match="broken.png"):
        predict_images(RedClass(), [bad], INFO, tmp_path / "out")


def test_bad_inputs_are_one_line_data_errors(tmp_path):
    with pytest.raises(DataError, match="missing"):
        list_images(tmp_path / "missing")
    with pytest.raises(DataError, match="no images"):
        list_images(tmp_path)
    a, b = tmp_path / "x.png", tmp_path / "sub" / "x.jpg"
    with pytest.raises(DataError, match="same name"):
        predict_images(RedClass(), [a, b], INFO, tmp_path / "out")
    write_image(a, np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="overwrite this input"):
        predict_images(RedClass(), [a], INFO, tmp_path)
