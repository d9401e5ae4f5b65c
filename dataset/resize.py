"""Bringing any PIL image to an upright RGB image of the size training expects.

Every image goes through ``to_rgb`` so that the trainer only ever sees 8-bit RGB, whatever the
file held (palette, greyscale, 16-bit, alpha, CMYK, rotated phone photos).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from .errors import DatasetError

RESIZE_METHODS = ("None", "Stretch", "Crop", "Pad")
MIN_SIZE = 8  # smaller targets cannot survive the VAE's 8x downscale
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white (see to_rgb)
PAD_COLOR = (0, 0, 0)  # the bars Pad adds are black
HIGH_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
FLOAT_WHITE_LEVELS = (1.0, 255.0, 65535.0)  # float files from normalised, 8-bit and 16-bit data

_LANCZOS = getattr(Image, "Resampling", Image).LANCZOS  # Pillow < 9.1 has no Resampling


def to_rgb(img: Image.Image) -> Image.Image:
    """Upright (EXIF orientation applied) 8-bit RGB copy of ``img``.

    Transparency is composited on white, not black: line art and logos are usually dark ink
    on a transparent background, and on black they would vanish. That holds for an alpha channel
    and for a tRNS colour key alike (palette, greyscale, RGB, bilevel and 16-bit PNGs).
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in HIGH_DEPTH_MODES:
        img = _high_depth_to_8bit(img)
    elif "transparency" in img.info and img.mode not in ALPHA_MODES:
        img = img.convert("RGBA")  # PIL turns the tRNS key (any mode) into an alpha channel
    if img.mode in ALPHA_MODES:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def _high_depth_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit/float greyscale as "L" (or "LA" if it has a tRNS key), rescaled to 0..255.

    convert() would clip at 255 instead of rescaling, and its tRNS handling clips too.
    """
    raw = np.asarray(img)
    arr = np.nan_to_num(raw.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    white = _float_white_level(arr) if img.mode == "F" else 65535.0
    grey = Image.fromarray(np.clip(arr / white * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    key = img.info.get("transparency")
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        grey.putalpha(Image.fromarray(np.where(raw == key, 0, 255).astype(np.uint8), "L"))
    return grey


def _float_white_level(arr: np.ndarray) -> float:
    """The value that means white in a float image: the smallest of 1, 255 and 65535 that
    holds its brightest pixel, else that pixel.

    Float files carry no bit depth, so it is read from the data; fixed levels (not the image's
    own max) keep a dark 8-bit image dark instead of stretching it to full contrast.
    """
    peak = float(arr.max(initial=0.0))
    return next((level for level in FLOAT_WHITE_LEVELS if peak <= level), peak)


def check_resize_args(method: str, width: int, height: int) -> None:
    """Fails early (before any file is read) on a bad method or target size."""
    if method not in RESIZE_METHODS:
        raise DatasetError(
            f"resize_method {method!r} is not supported. Choose one of: {', '.join(RESIZE_METHODS)}."
        )
    if method == "None":
        return
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise DatasetError(f"{name} must be a whole number of pixels, got {value!r}.")
        if value < MIN_SIZE:
            raise DatasetError(
                f"{name} is {value}, but resizing with resize_method {method!r} needs at least "
                f"{MIN_SIZE} pixels. Set {name} to {MIN_SIZE} or more (multiples of 64 work best), "
                f"or set resize_method to None."
            )


def resize_image(img: Image.Image, method: str, width: int, height: int) -> Image.Image:
    """Returns an upright RGB image; sized width x height unless method is "None".

    - None: keeps the image's own size.
    - Stretch: exactly width x height, aspect ratio not kept.
    - Crop: scaled to cover the target, then the centre is cut out (edges lost).
    - Pad: scaled to fit inside the target, centred on black bars (nothing lost).
    """
    check_resize_args(method, width, height)
    img = to_rgb(img)
    if method == "None" or img.size == (width, height):
        return img
    if method == "Stretch":
        return img.resize((width, height), _LANCZOS)
    src_w, src_h = img.size
    if method == "Crop":
        # Cut the centred box with the target's aspect ratio from the source and resample it
        # in one step (resize's box argument), so no intermediate rounding shifts the centre.
        target_aspect = width / height
        if src_w / src_h > target_aspect:
            box_w, box_h = src_h * target_aspect, float(src_h)
        else:
            box_w, box_h = float(src_w), src_w / target_aspect
        left, top = (src_w - box_w) / 2, (src_h - box_h) / 2
        return img.resize((width, height), _LANCZOS, box=(left, top, left + box_w, top + box_h))
    # Pad
    scale = min(width / src_w, height / src_h)
    fit_w = min(width, max(1, round(src_w * scale)))
    fit_h = min(height, max(1, round(src_h * scale)))
    canvas = Image.new("RGB", (width, height), PAD_COLOR)
    canvas.paste(img.resize((fit_w, fit_h), _LANCZOS), ((width - fit_w) // 2, (height - fit_h) // 2))
    return canvas
