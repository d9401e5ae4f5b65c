"""Dataset loading: file listing, captions, resize modes, RGB/EXIF handling and user-facing errors."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import (
    RESIZE_METHODS,
    DatasetError,
    list_image_files,
    load_image_set,
    load_selected_images,
    read_caption,
    resize_image,
    stack_images,
)

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def solid(path: Path, size=(32, 32), color=RED, fmt=None) -> Path:
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def px(img: Image.Image, x: int, y: int) -> tuple:
    return img.getpixel((x, y))[:3]


def close(a, b, tol=12) -> bool:
    return all(abs(int(p) - int(q)) <= tol for p, q in zip(a, b))


# --- listing -------------------------------------------------------------------------------


def test_list_image_files_filters_and_sorts_naturally(tmp_path):
    for name in ["img10.png", "img2.PNG", "img1.JpG", "img.png", "b.webp", "c.tiff", "d.bmp", "e.jpeg"]:
        solid(tmp_path / name, fmt={"PNG": "PNG", "JPG": "JPEG", "WEBP": "WEBP", "TIFF": "TIFF",
                                    "BMP": "BMP", "JPEG": "JPEG"}[name.rsplit(".", 1)[1].upper()])
    (tmp_path / "img1.txt").write_text("caption")
    (tmp_path / "notes.md").write_text("x")
    solid(tmp_path / ".hidden.png")
    (tmp_path / "sub").mkdir()
    solid(tmp_path / "sub" / "inner.png")
    (tmp_path / "folder.png").mkdir()  # a directory with an image-like name is not an image

    names = [p.name for p in list_image_files(tmp_path)]
    assert names == ["b.webp", "c.tiff", "d.bmp", "e.jpeg", "img.png", "img1.JpG", "img2.PNG", "img10.png"]


def test_missing_folder_names_it_and_points_to_input_dir(tmp_path):
    missing = tmp_path / "my_dataset"
    with pytest.raises(DatasetError) as e:
        list_image_files(missing)
    msg = str(e.value)
    assert "my_dataset" in msg and "does not exist" in msg and "input directory" in msg


def test_file_instead_of_folder_is_rejected(tmp_path):
    f = solid(tmp_path / "one.png")
    with pytest.raises(DatasetError, match="one.png.*not a folder"):
        list_image_files(f)


def test_folder_without_images_lists_accepted_extensions(tmp_path):
    (tmp_path / "a.txt").write_text("only a caption")
    solid(tmp_path / ".hidden.png")
    with pytest.raises(DatasetError) as e:
        list_image_files(tmp_path)
    msg = str(e.value)
    assert "no images" in msg and ".png" in msg and ".jpg" in msg and ".webp" in msg


# --- captions ------------------------------------------------------------------------------


def test_read_caption_variants(tmp_path):
    img = solid(tmp_path / "photo.v2.png")
    assert read_caption(img, "default") == "default"  # no .txt
    (tmp_path / "photo.v2.txt").write_text("  a red square\n", encoding="utf-8")
    assert read_caption(img, "default") == "a red square"
    (tmp_path / "photo.v2.txt").write_text(" \n\t ", encoding="utf-8")
    assert read_caption(img, "default") == "default"  # blank falls back
    (tmp_path / "photo.v2.txt").write_bytes("\ufeffcafé au lait".encode("utf-8"))
    assert read_caption(img, "") == "café au lait"  # BOM stripped, utf-8 decoded


def test_non_utf8_caption_names_file(tmp_path):
    img = solid(tmp_path / "x.png")
    (tmp_path / "x.txt").write_bytes(b"caf\xe9")  # latin-1
    with pytest.raises(DatasetError, match=r"x\.txt.*UTF-8"):
        read_caption(img, "")


# --- resize --------------------------------------------------------------------------------


def bars(size=(200, 100), bar=50):
    """Green image with red bars `bar` pixels wide at the left and right edges."""
    img = Image.new("RGB", size, GREEN)
    img.paste(RED, (0, 0, bar, size[1]))
    img.paste(RED, (size[0] - bar, 0, size[0], size[1]))
    return img


def test_stretch_gives_exact_size_and_keeps_everything():
    out = resize_image(bars(), "Stretch", 64, 64)
    assert out.size == (64, 64) and out.mode == "RGB"
    assert close(px(out, 0, 32), RED) and close(px(out, 63, 32), RED)  # edges squeezed in, not cut
    assert close(px(out, 32, 32), GREEN)


def test_crop_cuts_edges_and_keeps_centre():
    out = resize_image(bars(), "Crop", 64, 64)
    assert out.size == (64, 64)
    # Covering 64x64 from 200x100 keeps the central 100x100, which is all green.
    for x, y in [(32, 32), (2, 2), (61, 61), (2, 61)]:
        assert close(px(out, x, y), GREEN, tol=40), (x, y, px(out, x, y))


def test_crop_tall_image_keeps_vertical_centre():
    img = Image.new("RGB", (40, 120), BLUE)
    img.paste(WHITE, (0, 40, 40, 80))  # middle third white
    out = resize_image(img, "Crop", 16, 16)
    assert out.size == (16, 16)
    assert close(px(out, 8, 8), WHITE) and close(px(out, 8, 1), WHITE, tol=40)


def test_pad_fits_inside_with_centered_black_bars():
    out = resize_image(Image.new("RGB", (200, 100), WHITE), "Pad", 64, 64)
    assert out.size == (64, 64)
    arr = np.asarray(out)
    white_rows = np.where(arr[:, 32].min(axis=1) > 200)[0]
    assert white_rows[0] == 16 and white_rows[-1] == 47  # 64x32 content centered vertically
    assert (arr[:16] == 0).all() and (arr[48:] == 0).all()  # black bars above and below
    assert (arr[16:48] > 200).all()  # full width kept: aspect 2:1 preserved


def test_pad_tall_image_gets_side_bars():
    out = resize_image(Image.new("RGB", (50, 100), WHITE), "Pad", 64, 64)
    arr = np.asarray(out)
    white_cols = np.where(arr[32].min(axis=1) > 200)[0]
    assert (white_cols[0], white_cols[-1]) == (16, 47)
    assert close(px(out, 0, 32), BLACK) and close(px(out, 63, 32), BLACK)


def test_none_keeps_size_and_composites_alpha_on_white():
    img = Image.new("RGBA", (30, 20), (0, 0, 0, 0))
    img.putpixel((5, 5), (255, 0, 0, 255))
    out = resize_image(img, "None", 1, 1)  # width/height ignored for None
    assert out.size == (30, 20) and out.mode == "RGB"
    assert px(out, 0, 0) == WHITE and px(out, 5, 5) == RED


def test_16bit_greyscale_is_rescaled_not_clipped(tmp_path):
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    got = load_image_set(tmp_path).images[0]
    assert got[0, 0, 0] == 0.0 and abs(float(got[0, 1, 0]) - 0.5) < 0.01 and got[0, 2, 0] == 1.0


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), RED)
    img.paste(BLUE, (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    t = load_image_set(tmp_path).images[0]
    assert tuple(t.shape) == (40, 20, 3)  # upright: taller than wide
    top = (t[2, 10] * 255).tolist()
    assert close(top, BLUE, tol=40)  # left of the stored image ends up on top after 90 CW


@pytest.mark.parametrize("method", ["crop", "Resize", "", None])
def test_invalid_resize_method(method):
    with pytest.raises(DatasetError) as e:
        resize_image(Image.new("RGB", (8, 8)), method, 64, 64)
    assert "resize_method" in str(e.value) and all(m in str(e.value) for m in RESIZE_METHODS)


@pytest.mark.parametrize("w,h,bad", [(4, 64, "width"), (64, 0, "height")])
def test_too_small_target_when_resizing(tmp_path, w, h, bad):
    solid(tmp_path / "a.png")
    with pytest.raises(DatasetError, match=rf"^{bad} is .*at least 8"):
        load_image_set(tmp_path, "Crop", w, h)


def test_small_size_ok_when_not_resizing(tmp_path):
    solid(tmp_path / "a.png", size=(10, 6))
    assert tuple(load_image_set(tmp_path, "None", 0, 0).images[0].shape) == (6, 10, 3)


def test_invalid_method_fails_before_reading_files(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="resize_method"):
        load_image_set(tmp_path, "Zoom", 64, 64)


# --- loading -------------------------------------------------------------------------------


def test_load_image_set_tensors_and_captions(tmp_path):
    solid(tmp_path / "a.png", (20, 10), RED)
    solid(tmp_path / "b.png", (10, 20), BLUE)
    solid(tmp_path / "c.png", (16, 16), GREEN)
    (tmp_path / "a.txt").write_text("red thing\n")
    (tmp_path / "c.txt").write_text("green thing")
    s = load_image_set(tmp_path, "Stretch", 16, 8, default_caption="fallback")
    assert [p.name for p in s.paths] == ["a.png", "b.png", "c.png"]
    assert s.captions == ["red thing", "fallback", "green thing"]
    for t, color in zip(s.images, [RED, BLUE, GREEN]):
        assert t.dtype == torch.float32 and tuple(t.shape) == (8, 16, 3)
        assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
        assert torch.allclose(t[4, 8], torch.tensor(color, dtype=torch.float32) / 255, atol=0.02)
    batch = stack_images(s)
    assert tuple(batch.shape) == (3, 8, 16, 3) and torch.equal(batch[1], s.images[1])


def test_corrupt_image_names_the_file(tmp_path):
    solid(tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DatasetError) as e:
        load_image_set(tmp_path)
    assert "bad.jpg" in str(e.value) and "good.png" not in str(e.value)


def test_truncated_image_names_the_file(tmp_path):
    full = solid(tmp_path / "cut.png", size=(64, 64)).read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])
    with pytest.raises(DatasetError, match=r"cut\.png"):
        load_image_set(tmp_path)


def test_stack_mismatched_sizes_lists_files_and_advice(tmp_path):
    solid(tmp_path / "wide.png", (64, 32))
    solid(tmp_path / "tall.png", (32, 64))
    solid(tmp_path / "wide2.png", (64, 32))
    s = load_image_set(tmp_path)  # method None keeps sizes
    with pytest.raises(DatasetError) as e:
        stack_images(s)
    msg = str(e.value)
    assert "'tall.png' is 32x64" in msg and "'wide.png' is 64x32" in msg
    assert "resize_method" in msg and "bucketing" in msg


def test_load_selected_images_paths_and_pil(tmp_path):
    p1 = solid(tmp_path / "one.png", (20, 20), RED)
    p2 = solid(tmp_path / "two.png", (40, 20), BLUE)
    (tmp_path / "two.txt").write_text("blue caption")
    mem = Image.new("RGBA", (10, 10), (0, 255, 0, 255))
    s = load_selected_images([str(p2), mem, p1], "Pad", 32, 32, default_caption="dflt")
    assert s.captions == ["blue caption", "dflt", "dflt"]
    assert [p.name for p in s.paths] == ["two.png", "<image 2>", "one.png"]
    assert all(tuple(t.shape) == (32, 32, 3) for t in s.images)
    assert torch.allclose(s.images[1][16, 16], torch.tensor([0.0, 1.0, 0.0]), atol=0.02)
    assert float(s.images[0][0, 16].max()) == 0.0  # pad bar above the 2:1 image


def test_load_selected_images_errors(tmp_path):
    with pytest.raises(DatasetError, match="no images were selected"):
        load_selected_images([])
    with pytest.raises(DatasetError, match=r"gone\.png.*does not exist"):
        load_selected_images([tmp_path / "gone.png"])
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError, match=r"bad\.png"):
        load_selected_images([tmp_path / "bad.png"])
