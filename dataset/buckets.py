"""Aspect-ratio bucketing: each image keeps (close to) its own shape at about the target area.

Like kohya's buckets: a bucket is a (width, height) pair, both multiples of ``step``, whose area
does not exceed width*height of the target; an image goes to the bucket with the nearest aspect
ratio and is scaled to cover it and centre-cropped. Images in the same bucket can share a batch.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from .image_folder import ImageSet, pil_to_tensor
from .resize import resize_image


def bucket_resolution(src_w: int, src_h: int, width: int, height: int, step: int = 64) -> tuple[int, int]:
    """The bucket for a src_w x src_h image when the target resolution is width x height."""
    area = width * height
    aspect = src_w / src_h
    best, best_err = (width, height), math.inf
    max_side = max(width, height) * 2
    for w in range(step, max_side + 1, step):
        h = min(max_side, (area // w) // step * step)
        if h < step:
            continue
        err = abs(math.log((w / h) / aspect))
        if err < best_err - 1e-12 or (abs(err - best_err) <= 1e-12 and w * h > best[0] * best[1]):
            best, best_err = (w, h), err
    return best


def apply_buckets(image_set: ImageSet, width: int, height: int, step: int = 64) -> ImageSet:
    """The same images, each cropped to its aspect bucket (see bucket_resolution)."""
    out = ImageSet(captions=list(image_set.captions), paths=list(image_set.paths))
    for img in image_set.images:
        h, w = img.shape[0], img.shape[1]
        bw, bh = bucket_resolution(w, h, width, height, step)
        pil = tensor_to_pil(img)
        out.images.append(pil_to_tensor(resize_image(pil, "Crop", bw, bh)))
    return out


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """One [H, W, 3] (or [1, H, W, 3]) 0..1 tensor -> RGB PIL image."""
    if image.ndim == 4:
        image = image[0]
    return Image.fromarray((image.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))
