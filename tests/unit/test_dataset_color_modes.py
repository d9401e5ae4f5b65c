"""to_rgb on files whose colour mode needs care: tRNS transparency in any mode, and float images."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset import load_image_set, to_rgb

WHITE = (255, 255, 255)


def reopen(path: Path) -> Image.Image:
    """The file as the loader sees it: decoded, with its info (tRNS) intact."""
    with Image.open(path) as img:
        img.load()
        return img.copy()


def pixels(img: Image.Image) -> list:
    out = to_rgb(img)
    assert out.mode == "RGB"
    return [out.getpixel((x, 0)) for x in range(out.width)]


def test_greyscale_png_with_trns_composites_on_white(tmp_path):
    arr = np.array([[0, 200, 0]], dtype=np.uint8)  # 0 is the transparent key
    Image.fromarray(arr, "L").save(tmp_path / "grey.png", transparency=0)
    img = reopen(tmp_path / "grey.png")
    assert img.mode == "L" and img.info["transparency"] == 0
    assert pixels(img) == [WHITE, (200, 200, 200), WHITE]


def test_rgb_png_with_trns_composites_on_white(tmp_path):
    arr = np.array([[[0, 0, 0], [10, 20, 30], [0, 0, 0]]], dtype=np.uint8)
    Image.fromarray(arr, "RGB").save(tmp_path / "rgb.png", transparency=(0, 0, 0))
    img = reopen(tmp_path / "rgb.png")
    assert img.mode == "RGB" and img.info["transparency"] == (0, 0, 0)
    assert pixels(img) == [WHITE, (10, 20, 30), WHITE]


def test_bilevel_png_with_trns_composites_on_white(tmp_path):
    img = Image.new("1", (3, 1), 0)
    img.putpixel((1, 0), 1)
    img.save(tmp_path / "one.png", transparency=0)
    assert pixels(reopen(tmp_path / "one.png")) == [WHITE, WHITE, WHITE]  # black is transparent


def test_palette_png_with_trns_still_composites_on_white(tmp_path):
    img = Image.new("P", (2, 1), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((1, 0), 1)
    img.save(tmp_path / "pal.png", transparency=0)
    assert pixels(reopen(tmp_path / "pal.png")) == [WHITE, (255, 0, 0)]


def test_16bit_greyscale_png_with_trns_is_rescaled_and_composited(tmp_path):
    arr = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png", transparency=1000)
    img = reopen(tmp_path / "deep.png")
    assert img.mode.startswith("I") and img.info["transparency"] == 1000
    assert pixels(img) == [(0, 0, 0), (128, 128, 128), WHITE, WHITE]  # 1000 is the key, not a dark grey


def test_greyscale_without_trns_is_unchanged(tmp_path):
    Image.fromarray(np.array([[0, 200]], dtype=np.uint8), "L").save(tmp_path / "plain.png")
    assert pixels(reopen(tmp_path / "plain.png")) == [(0, 0, 0), (200, 200, 200)]


def test_transparent_area_of_greyscale_png_is_white_after_loading(tmp_path):
    arr = np.zeros((8, 8), dtype=np.uint8)
    arr[2:6, 2:6] = 50  # an ink square on a transparent (0) background
    Image.fromarray(arr, "L").save(tmp_path / "ink.png", transparency=0)
    t = load_image_set(tmp_path).images[0]
    assert t[0, 0].tolist() == [1.0, 1.0, 1.0]
    assert abs(float(t[3, 3, 0]) - 50 / 255) < 1e-6


@pytest.mark.parametrize("values,expected", [
    ([0.0, 128.0, 255.0], [0, 128, 255]),  # 8-bit data stored as float (a common TIFF)
    ([0.0, 0.5, 1.0], [0, 128, 255]),  # normalised float
    ([0.0, 32768.0, 65535.0], [0, 128, 255]),  # 16-bit data stored as float
    ([0.0, 100.0, 200.0], [0, 100, 200]),  # dark 8-bit image: not stretched to its own max
    ([-5.0, 300.0, 600.0], [0, 1, 2]),  # above 255: read as 16-bit data, like I;16 files; negatives clip
    ([0.0, 70000.0, 140000.0], [0, 128, 255]),  # beyond every common range: scaled by its own max
])
def test_float_images_use_the_range_their_values_fit(tmp_path, values, expected):
    Image.fromarray(np.array([values], dtype=np.float32), "F").save(tmp_path / "f.tif")
    img = reopen(tmp_path / "f.tif")
    assert img.mode == "F"
    assert [p[0] for p in pixels(img)] == expected


def test_float_image_with_nan_does_not_crash():
    img = Image.fromarray(np.array([[np.nan, 255.0]], dtype=np.float32), "F")
    assert [p[0] for p in pixels(img)] == [0, 255]
