"""A synthetic captioned image folder with one visible, learnable motif.

Training tests and demos need data that is small, free to ship, identical on every machine and
carries something a LoRA can visibly learn. Each image has its own soft background (colour
gradient + low-frequency noise) and the same motif, a red ring around a yellow star, at a random
position and scale; the caption names the trigger word and the background colour, as in
``a photo of lrlb motif on a blue background``.

Only PIL and numpy are used, with per-image seeds, so the same arguments give byte-identical files
and image ``i`` does not depend on ``count``.

CLI: ``python -m devkit.motif_dataset --out DIR [--count N] [--size S] [--seed K] [--mixed-sizes]``.
"""
from __future__ import annotations

import argparse
import math
import pathlib

import numpy as np
from PIL import Image, ImageDraw

TRIGGER = "lrlb"
RING_RGB = (230, 30, 30)
STAR_RGB = (255, 215, 0)

# Background colours (dark, light shade). None is red, orange or yellow, so the motif stays
# the only strongly red/yellow thing in an image.
BACKGROUNDS = {
    "blue": ((35, 70, 190), (95, 145, 235)),
    "green": ((35, 120, 55), (125, 195, 105)),
    "purple": ((85, 50, 145), (160, 120, 210)),
    "teal": ((25, 115, 125), (100, 190, 190)),
    "gray": ((95, 95, 100), (175, 175, 180)),
    "white": ((215, 215, 220), (250, 250, 252)),
    "black": ((12, 12, 16), (60, 60, 72)),
    "brown": ((80, 60, 45), (140, 115, 90)),
}

# Aspect ratios (w:h) cycled through when mixed_sizes=True; each keeps about size*size pixels.
MIXED_ASPECTS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3))

_SUPERSAMPLE = 4  # the motif is drawn this much larger, then downsampled, for smooth edges


def caption_for(background: str) -> str:
    return f"a photo of {TRIGGER} motif on a {background} background"


def _dimensions(index: int, size: int, mixed_sizes: bool) -> tuple[int, int]:
    """(width, height) of image ``index``; mixed sizes keep the area and round to multiples of 8."""
    if not mixed_sizes:
        return size, size
    aw, ah = MIXED_ASPECTS[index % len(MIXED_ASPECTS)]
    scale = size / math.sqrt(aw * ah)
    return max(8, round(aw * scale / 8) * 8), max(8, round(ah * scale / 8) * 8)


def _background(rng: np.random.Generator, name: str, width: int, height: int) -> np.ndarray:
    """A float RGB array: a jittered two-colour gradient at a random angle plus soft noise."""
    dark, light = (np.array(c, dtype=np.float64) for c in BACKGROUNDS[name])
    dark = dark + rng.uniform(-15, 15, 3)
    light = light + rng.uniform(-15, 15, 3)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    t = (xs / width - 0.5) * math.cos(angle) + (ys / height - 0.5) * math.sin(angle)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    img = dark + (light - dark) * t[..., None]

    # Low-frequency blotches: a coarse random grid upsampled smoothly, one per channel.
    grid = rng.normal(0.0, 14.0, (5, 5, 3))
    blotches = np.stack(
        [np.asarray(Image.fromarray(grid[..., c].astype(np.float32)).resize((width, height), Image.BICUBIC))
         for c in range(3)],
        axis=-1,
    )
    return img + blotches + rng.normal(0.0, 3.0, (height, width, 3))


def _star_points(cx: float, cy: float, radius: float, rotation: float) -> list[tuple[float, float]]:
    """Vertices of a five-pointed star, alternating outer and inner radius."""
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.42
        a = rotation + k * math.pi / 5
        points.append((cx + r * math.sin(a), cy - r * math.cos(a)))
    return points


def _motif_masks(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Antialiased coverage masks (0..1) of the ring and the star at a random place and scale."""
    outer = rng.uniform(0.13, 0.27) * min(width, height)
    cx = rng.uniform(outer + 2, width - outer - 2)
    cy = rng.uniform(outer + 2, height - outer - 2)
    rotation = rng.uniform(0, 2 * math.pi / 5)

    s = _SUPERSAMPLE
    big = (width * s, height * s)
    ring = Image.new("L", big, 0)
    draw = ImageDraw.Draw(ring)
    draw.ellipse([(cx - outer) * s, (cy - outer) * s, (cx + outer) * s, (cy + outer) * s], fill=255)
    inner = outer * 0.78
    draw.ellipse([(cx - inner) * s, (cy - inner) * s, (cx + inner) * s, (cy + inner) * s], fill=0)

    star = Image.new("L", big, 0)
    ImageDraw.Draw(star).polygon(
        [(x * s, y * s) for x, y in _star_points(cx, cy, outer * 0.66, rotation)], fill=255
    )

    def shrink(mask: Image.Image) -> np.ndarray:
        return np.asarray(mask.resize((width, height), Image.LANCZOS), dtype=np.float64)[..., None] / 255.0

    return shrink(ring), shrink(star)


def render_motif_image(index: int, size: int = 256, seed: int = 0, mixed_sizes: bool = False) -> tuple[Image.Image, str]:
    """Image ``index`` of the dataset for ``seed`` and its caption."""
    names = sorted(BACKGROUNDS)
    # Walk the colours in a seed-dependent order so neighbouring images get different backgrounds.
    order = np.random.default_rng([seed, 0xB6]).permutation(len(names))
    background = names[order[index % len(names)]]
    rng = np.random.default_rng([seed, index])
    width, height = _dimensions(index, size, mixed_sizes)

    img = _background(rng, background, width, height)
    ring, star = _motif_masks(rng, width, height)
    img = img * (1 - ring) + np.array(RING_RGB, dtype=np.float64) * ring
    img = img * (1 - star) + np.array(STAR_RGB, dtype=np.float64) * star
    pixels = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels), caption_for(background)


def make_motif_dataset(folder, count: int = 8, size: int = 256, seed: int = 0, mixed_sizes: bool = False) -> list[pathlib.Path]:
    """Write ``motif_XXX.png`` + same-named ``.txt`` captions into ``folder``; return the PNG paths."""
    if count < 1 or size < 32:
        raise ValueError("need count >= 1 and size >= 32")
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        image, caption = render_motif_image(index, size=size, seed=seed, mixed_sizes=mixed_sizes)
        path = folder / f"motif_{index:03d}.png"
        image.save(path, format="PNG", optimize=False, compress_level=6)
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the images and captions into")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed-sizes", action="store_true", help="vary sizes and aspect ratios")
    args = parser.parse_args(argv)
    for path in make_motif_dataset(args.out, args.count, args.size, args.seed, args.mixed_sizes):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
