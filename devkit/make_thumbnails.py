"""Regenerates the template thumbnails (example_workflows/<name>.jpg) from what each template
really produces: it starts ComfyUI with the pack on the generated tiny model, runs every template
as the browser would queue it, and lays out the images it saved (samples, previews, the
side-by-side pair) above its loss graph, under the template's headline.

The frontend's template browser shows a custom node's ``<name>.jpg`` in a square card, so the
thumbnails are square, 512 px, JPEG quality 85.

``python -m devkit.make_thumbnails [--only NAME ...] [--workdir DIR]``
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .comfy_host import PACK_DIR, ComfyServer, execution_error, make_base_directory
from .fixtures import DATASET_NAME, install_example_lora, motif_dataset, tiny_checkpoint
from .run_demo import saved_files
from .templates import TEMPLATE_DIR, TEMPLATES, TITLES
from .workflow_api import nodes_of_type, ui_to_api

SIDE = 512
TITLE_BAND = 64
MARGIN = 12
BACKGROUND = (24, 26, 30)
QUALITY = 85


@dataclass
class TemplateOutputs:
    """The images one template run saved: pictures (samples, previews, pairs) and the loss graph."""
    pictures: list[Path] = field(default_factory=list)
    graph: Path | None = None


def run_template(server: ComfyServer, base: Path, name: str) -> TemplateOutputs:
    """Runs ``example_workflows/<name>.json`` as-is and returns the images it saved."""
    workflow = json.loads((TEMPLATE_DIR / f"{name}.json").read_text())
    prompt = ui_to_api(workflow, server.get_json("/object_info"))
    entry = server.run_prompt(prompt)
    error = execution_error(entry)
    if error:
        raise RuntimeError(f"template {name} failed in {error.get('node_type')}: {error.get('exception_message')}")
    graphs = saved_files(entry, prompt, "LoraLab_LossGraph", "images", base)
    pictures = [path for nid, node in prompt.items() if node["class_type"] != "LoraLab_LossGraph"
                for path in saved_files(entry, {nid: node}, node["class_type"], "images", base)]
    return TemplateOutputs(sorted(set(pictures), key=lambda p: (p.stat().st_mtime, p.name)), graphs[0] if graphs else None)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    scale = min(width / image.width, height / image.height)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)


def compose(title: str, outputs: TemplateOutputs) -> Image.Image:
    """A square card: the headline, a row of the pictures (at most four), the loss graph below."""
    card = Image.new("RGB", (SIDE, SIDE), BACKGROUND)
    draw = ImageDraw.Draw(card)
    draw.text((MARGIN, 10), "LoRA Lab", font=_font(16), fill=(140, 190, 140))
    draw.text((MARGIN, 30), title, font=_font(22), fill=(235, 235, 235))
    top, inner = TITLE_BAND, SIDE - 2 * MARGIN
    pictures = outputs.pictures[-4:]
    graph_height = SIDE - top - MARGIN
    if pictures:
        row_height = (SIDE - top) // 2 if outputs.graph else SIDE - top - MARGIN
        cell = (inner - MARGIN * (len(pictures) - 1)) // len(pictures)
        x = MARGIN
        for path in pictures:
            with Image.open(path) as im:
                tile = _fit(im.convert("RGB"), cell, row_height - MARGIN)
            card.paste(tile, (x + (cell - tile.width) // 2, top + (row_height - MARGIN - tile.height) // 2))
            x += cell + MARGIN
        top += row_height
        graph_height = SIDE - top - MARGIN
    if outputs.graph:
        with Image.open(outputs.graph) as im:
            graph = _fit(im.convert("RGB"), inner, graph_height)
        card.paste(graph, ((SIDE - graph.width) // 2, top + (graph_height - graph.height) // 2))
    return card


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(TEMPLATES), help="templates to redo (default: all)")
    parser.add_argument("--workdir", type=Path, default=PACK_DIR / "artifacts" / "thumbnails",
                        help="ComfyUI base directory for the runs (their outputs stay here)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    base = make_base_directory(args.workdir.resolve(), [tiny_checkpoint()], {DATASET_NAME: motif_dataset()})
    install_example_lora(base)
    with ComfyServer(base) as server:
        for name in args.only or TEMPLATES:
            card = compose(TITLES[name], run_template(server, base, name))
            path = TEMPLATE_DIR / f"{name}.jpg"
            card.save(path, "JPEG", quality=QUALITY, optimize=True)
            print(f"{path} ({path.stat().st_size // 1024} kB)", flush=True)
    print(f"done in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
