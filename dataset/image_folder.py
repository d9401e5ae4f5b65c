"""Reading a training set: images from a folder (or a user's selection) plus per-image captions.

Captions follow the common trainer convention: ``photo.png`` is described by ``photo.txt`` next to
it; images without one get the node's default caption. Images come back as ComfyUI-style float
tensors so node code can preview them or hand them to the VAE directly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Union

import numpy as np
import torch
from PIL import Image

from .errors import DatasetError
from .resize import check_resize_args, resize_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

ImageSource = Union[str, Path, Image.Image]


@dataclass
class ImageSet:
    """Images ([H, W, 3] float32 in 0..1), their captions and where each came from.

    For in-memory PIL images without a file name, ``paths`` holds a placeholder like
    ``<image 2>`` so messages can still point at the image.
    """

    images: list[torch.Tensor] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def _natural_key(name: str) -> list:
    """Sort key putting img2 before img10 (split alternates text and digit runs)."""
    parts = re.split(r"(\d+)", name.lower())
    return [int(p) if i % 2 else p for i, p in enumerate(parts)]


def list_image_files(folder: Union[str, Path]) -> list[Path]:
    """Image files directly inside ``folder`` (not subfolders, not hidden), in natural name order."""
    folder = Path(folder)
    if not folder.exists():
        raise DatasetError(
            f"folder '{folder}' does not exist. Put your training images in a folder under "
            f"ComfyUI's input directory and enter that folder's name (or an absolute path)."
        )
    if not folder.is_dir():
        raise DatasetError(
            f"folder '{folder}' is a file, not a folder. Enter the folder that contains the images."
        )
    files = [
        p for p in folder.iterdir()
        if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    ]
    if not files:
        raise DatasetError(
            f"folder '{folder}' contains no images. Accepted file types: "
            f"{', '.join(IMAGE_EXTENSIONS)} (images in subfolders are not read)."
        )
    # Stem first, so "img.png" < "img2.png" < "img10.png" whatever the extensions.
    return sorted(files, key=lambda p: (_natural_key(p.stem), p.suffix.lower(), p.name))


def caption_file(image_path: Union[str, Path]) -> Path:
    """Where the caption of ``image_path`` lives: the same name with .txt (photo.png -> photo.txt)."""
    return Path(image_path).with_suffix(".txt")


def read_caption(image_path: Union[str, Path], default_caption: str = "") -> str:
    """Text of the same-named .txt file, or ``default_caption`` if it is missing or blank."""
    caption_path = caption_file(image_path)
    if not caption_path.is_file():
        return default_caption
    try:
        text = caption_path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM from Notepad
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"caption file '{caption_path}' is not valid UTF-8 ({e.reason} at byte {e.start}). "
            f"Re-save it with UTF-8 encoding."
        ) from None
    except OSError as e:
        raise DatasetError(f"caption file '{caption_path}' could not be read: {e}.") from None
    return text.strip() or default_caption


def open_image(path: Union[str, Path]) -> Image.Image:
    """Fully decoded image from ``path``; any failure becomes a DatasetError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"image file '{path}' does not exist. Check the path or select the image again.")
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so truncated files fail here rather than later
            return img.copy()
    except Image.DecompressionBombError as e:
        raise DatasetError(
            f"image file '{path}' is too large to load safely ({e}). Downscale it before training."
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(
            f"image file '{path}' could not be read as an image ({e}). "
            f"Replace it with a valid image or remove it from the dataset."
        ) from None


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [H, W, 3] float32 tensor in 0..1 (ComfyUI's per-image layout)."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr))


def _load(
    sources: Iterable[ImageSource], resize_method: str, width: int, height: int, default_caption: str
) -> ImageSet:
    out = ImageSet()
    for i, src in enumerate(sources):
        if isinstance(src, Image.Image):
            name = getattr(src, "filename", "") or ""
            path = Path(name) if name else Path(f"<image {i + 1}>")
            img, caption = src, (read_caption(path, default_caption) if name else default_caption)
        else:
            path = Path(src)
            img, caption = open_image(path), read_caption(path, default_caption)
        try:
            img = resize_image(img, resize_method, width, height)
        except (OSError, ValueError) as e:  # e.g. a mode PIL cannot convert
            if isinstance(e, DatasetError):
                raise
            raise DatasetError(
                f"image '{path}' could not be converted to RGB ({e}). Re-save it as PNG or JPEG."
            ) from None
        out.images.append(pil_to_tensor(img))
        out.captions.append(caption)
        out.paths.append(path)
    return out


def load_image_set(
    folder: Union[str, Path],
    resize_method: str = "None",
    width: int = 512,
    height: int = 512,
    default_caption: str = "",
) -> ImageSet:
    """All images in ``folder`` with their captions, resized per ``resize_method``."""
    check_resize_args(resize_method, width, height)
    return _load(list_image_files(folder), resize_method, width, height, default_caption)


def load_selected_images(
    sources: Iterable[ImageSource],
    resize_method: str = "None",
    width: int = 512,
    height: int = 512,
    default_caption: str = "",
) -> ImageSet:
    """Images the user picked (file paths and/or PIL images), handled like a folder's images.

    Order is kept as given. Captions come from a .txt beside each file path; in-memory images
    without a file name get ``default_caption``.
    """
    check_resize_args(resize_method, width, height)
    sources = list(sources)
    if not sources:
        raise DatasetError("no images were selected. Select or upload at least one image.")
    return _load(sources, resize_method, width, height, default_caption)


def stack_images(image_set: ImageSet) -> torch.Tensor:
    """One [N, H, W, 3] batch (ComfyUI's IMAGE); needs every image to have the same size."""
    if not image_set.images:
        raise DatasetError("the image set is empty, so there is nothing to stack.")
    first_of_size: dict[tuple[int, int], Path] = {}
    for img, path in zip(image_set.images, image_set.paths):
        first_of_size.setdefault((img.shape[1], img.shape[0]), path)
    if len(first_of_size) > 1:
        shown = list(first_of_size.items())[:4]
        listed = ", ".join(f"'{p.name}' is {w}x{h}" for (w, h), p in shown)
        more = f" (and {len(first_of_size) - len(shown)} more sizes)" if len(first_of_size) > 4 else ""
        raise DatasetError(
            f"the images have {len(first_of_size)} different sizes, so they cannot form one batch: "
            f"{listed}{more}. Choose a resize_method other than None (Stretch, Crop or Pad) "
            f"with a width and height, or turn on bucketing."
        )
    return torch.stack(image_set.images, dim=0)
