"""The pack's workflow templates (example_workflows/*.json), defined once here and written in the
UI format the frontend's template browser opens.

Every template runs as-is on the generated tiny SD1.5 model and the motif image set (the names
below are what devkit.fixtures installs), with values that are sensible for real training apart
from the step count, and a note on the canvas saying what to change for a real model.

``python -m devkit.templates`` starts a ComfyUI with the pack (for its /object_info) and rewrites
example_workflows/*.json; ``--object-info FILE`` uses a saved /object_info instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .comfy_host import PACK_DIR
from .example_lora import EXAMPLE_LORA_FILENAME
from .fixtures import DATASET_NAME
from .tiny_model import CHECKPOINT_FILENAME
from .ui_workflow import UINode, UIWorkflow

TEMPLATE_DIR = PACK_DIR / "example_workflows"
TRIGGER = "a photo of lrlb motif"
SIZE = 128  # the tiny model's training and sampling size; 512 for SD1.5, 1024 for SDXL
LIVE_CHART_HEIGHT, LIVE_SAMPLES_HEIGHT = 210, 170  # the Train LoRA node's live widget (js/loralab_train.js)

LOAD_COLOR, TRAIN_COLOR, SAVE_COLOR, CHECK_COLOR = "#3f789e", "#8A8", "#b58b2a", "#a1309b"

REAL_MODEL_NOTE = f"""
**For a real model**
- *Load checkpoint*: your SD1.5 or SDXL checkpoint.
- *Training images*: a folder under `ComfyUI/input/` with 10–50 images and a same-named `.txt`
  caption beside each; put a rare trigger word in every caption or in *default_caption*.
- width/height: 512 for SD1.5, 1024 for SDXL (turn on *bucketing* for mixed aspect ratios).
- steps: about 100 per image (1000–3000); rank 16–32 with alpha = rank/2; learning_rate 1e-4.
- Sampling sizes below: the same as the training size.

The settings here are sized for the tiny test model (`{CHECKPOINT_FILENAME}`, {SIZE} px) so the
template runs in under a minute on a CPU."""


def _dataset(wf: UIWorkflow, x: float, y: float) -> tuple[UINode, UINode, UINode, UINode]:
    """Checkpoint, captioned image folder, VAE-encoded images and encoded captions, in a group."""
    ckpt = wf.add("CheckpointLoaderSimple", (x, y), "Load checkpoint", {"ckpt_name": CHECKPOINT_FILENAME})
    images = wf.add("LoraLab_LoadImageSet", (x, y + 150), "Training images (folder under input/)",
                    {"folder": DATASET_NAME, "resize_method": "Crop", "width": SIZE, "height": SIZE,
                     "default_caption": TRIGGER, "bucketing": False})
    encode = wf.add("VAEEncode", (x + 360, y + 150), "Encode images", width=220)
    captions = wf.add("CLIPTextEncode", (x + 360, y + 250), "Encode captions", {"text": ""}, width=260)
    wf.connect(images, "images", encode, "pixels")
    wf.connect(ckpt, "VAE", encode, "vae")
    wf.connect(ckpt, "CLIP", captions, "clip")
    wf.connect(images, "captions", captions, "text")
    wf.group("1. Model and captioned training images", [ckpt, images, encode, captions], LOAD_COLOR)
    return ckpt, images, encode, captions


def _train(wf: UIWorkflow, pos, ckpt: UINode, images: UINode, encode: UINode, captions: UINode, **widgets) -> UINode:
    # Room for the live chart, and for the preview strip when the template makes previews
    # (js/loralab_train.js: CHART_HEIGHT, SAMPLE_HEIGHT), so the node never grows out of its group.
    live = LIVE_CHART_HEIGHT + (LIVE_SAMPLES_HEIGHT if widgets.get("sample_every") else 0)
    train = wf.add("LoraLab_TrainLora", pos, "Train LoRA", widgets, width=360, extra_height=live)
    wf.connect(ckpt, "MODEL", train, "model")
    wf.connect(encode, "LATENT", train, "latents")
    wf.connect(captions, "CONDITIONING", train, "positive")
    wf.connect(images, "captions", train, "captions")
    return train


def _save(wf: UIWorkflow, x: float, y: float, train: UINode, prefix: str, loss_prefix: str) -> tuple[UINode, UINode]:
    save = wf.add("LoraLab_SaveLoRA", (x, y), "Save LoRA (to output/loras)", {"prefix": prefix, "key_style": "kohya"})
    wf.connect(train, "lora", save, "lora")
    wf.connect(train, "steps", save, "steps")
    graph = wf.add("LoraLab_LossGraph", (x, y + 150), "Loss graph", {"filename_prefix": loss_prefix}, width=420)
    graph.size = (420, 320)
    wf.connect(train, "loss_map", graph, "loss")
    wf.group("3. Save the LoRA and plot the loss", [save, graph], SAVE_COLOR)
    return save, graph


def _prompts(wf: UIWorkflow, x: float, y: float, ckpt: UINode, prompt_title: str = "Prompt") -> tuple[UINode, UINode]:
    positive = wf.add("CLIPTextEncode", (x, y), prompt_title, {"text": TRIGGER}, width=340)
    negative = wf.add("CLIPTextEncode", (x, wf.below(positive)), "Negative prompt", {"text": ""}, width=340)
    wf.connect(ckpt, "CLIP", positive, "clip")
    wf.connect(ckpt, "CLIP", negative, "clip")
    return positive, negative


def basic_lora(object_info: dict) -> dict:
    """1. A LoRA from a folder of captioned images, with the loss chart and one test image."""
    wf = UIWorkflow(object_info, "6f1c2a52-8f7e-4a7e-9a51-10ad0000b001")
    ckpt, images, encode, captions = _dataset(wf, 20, 60)
    train = _train(wf, (700, 60), ckpt, images, encode, captions, steps=30, learning_rate=0.0005, rank=8, alpha=8.0)
    wf.group("2. Train (watch the loss)", [train], TRAIN_COLOR)
    _save(wf, 1120, 60, train, "loras/loralab_demo", "loralab_loss")
    apply = wf.add("LoraLab_LoadLoraModel", (1620, 60), "Apply LoRA", {"strength_model": 1.0})
    wf.connect(ckpt, "MODEL", apply, "model")
    wf.connect(train, "lora", apply, "lora")
    positive, negative = _prompts(wf, 1620, 200, ckpt)
    latent = wf.add("EmptyLatentImage", (1620, wf.below(negative)), "Image size", {"width": SIZE, "height": SIZE, "batch_size": 1},
                    width=340)
    sampler = wf.add("KSampler", (2000, 60), "Sample with the LoRA", {"seed": 0, "steps": 20, "cfg": 5.0,
                     "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0})
    wf.connect(apply, "model", sampler, "model")
    wf.connect(positive, "CONDITIONING", sampler, "positive")
    wf.connect(negative, "CONDITIONING", sampler, "negative")
    wf.connect(latent, "LATENT", sampler, "latent_image")
    decode = wf.add("VAEDecode", (2000, 380), "Decode", width=220)
    wf.connect(sampler, "LATENT", decode, "samples")
    wf.connect(ckpt, "VAE", decode, "vae")
    image = wf.add("SaveImage", (2360, 60), "Sample image", {"filename_prefix": "loralab_sample"})
    image.size = (320, 360)
    wf.connect(decode, "IMAGE", image, "images")
    wf.group("4. Try it: an image with the LoRA applied",
             [apply, positive, negative, latent, sampler, decode, image], CHECK_COLOR)
    wf.note(f"""## Train a LoRA from a folder of images

1. **Training images** reads every image of `input/{DATASET_NAME}/` and the caption in the
   `.txt` file of the same name (images without one get *default_caption*).
2. **Train LoRA** trains; its node draws the loss live while it runs. Press **Run**.
3. **Save LoRA** writes `output/loras/loralab_demo_<steps>_steps_00001_.safetensors`; the
   loss graph is saved beside the other outputs.
4. **Apply LoRA** + **KSampler** make a test image with the new LoRA.

Cancelling keeps the work: a resumable checkpoint is saved and the message says how to continue.
{REAL_MODEL_NOTE}""", (20, 560), (620, 520))
    return wf.to_json()


def continue_training(object_info: dict) -> dict:
    """2. Continue training a saved LoRA (existing_lora), restoring its optimizer state."""
    wf = UIWorkflow(object_info, "6f1c2a52-8f7e-4a7e-9a51-10ad0000b002")
    ckpt, images, encode, captions = _dataset(wf, 20, 60)
    train = _train(wf, (700, 60), ckpt, images, encode, captions, steps=24, learning_rate=0.0005, rank=8,
                   alpha=8.0, existing_lora=EXAMPLE_LORA_FILENAME)
    wf.group("2. Continue the existing_lora", [train], TRAIN_COLOR)
    _save(wf, 1120, 60, train, "loras/loralab_continued", "loralab_continued_loss")
    wf.note(f"""## Continue training a saved LoRA

**existing_lora** picks a LoRA from `models/loras` or `output/loras` (here `{EXAMPLE_LORA_FILENAME}`, a LoRA of
the tiny test model trained for 6 steps). Training goes on from its weights for **steps** more
steps; the saved file counts all of them (`loralab_continued_30_steps_...`).

- Its algorithm, rank, alpha and layers come from the file: those widgets are ignored.
- When `<name>.trainstate` lies beside the file (LoRA Lab writes one with every save and with
  every checkpoint), the optimizer state, random state and image order are restored too:
  6 + 24 steps give the same LoRA as 30 steps in one run. Keep the same optimizer for that.
- To continue your own LoRA: LoRAs and checkpoints saved under `output/loras` are listed here
  too (with their `.trainstate` beside them); press **R** to refresh, then pick it.
- LoRAs of other trainers (kohya-style files, ComfyUI's own trainer) continue from their weights.

Train on the same images (and captions) the LoRA was started on.
{REAL_MODEL_NOTE}""", (20, 560), (620, 600))
    return wf.to_json()


def lokr_previews(object_info: dict) -> dict:
    """3. A LoKr adapter, with preview images made every few steps while it trains."""
    wf = UIWorkflow(object_info, "6f1c2a52-8f7e-4a7e-9a51-10ad0000b003")
    ckpt, images, encode, captions = _dataset(wf, 20, 60)
    preview = wf.add("CLIPTextEncode", (20, 540), "Preview prompt", {"text": TRIGGER}, width=620)
    wf.connect(ckpt, "CLIP", preview, "clip")
    wf.group("Prompt of the preview images", [preview], TRAIN_COLOR)
    train = _train(wf, (700, 60), ckpt, images, encode, captions, steps=24, learning_rate=0.001, rank=8,
                   alpha=8.0, algorithm="LoKr", lokr_factor=-1, sample_every=8, sample_seed=42,
                   sample_width=SIZE, sample_height=SIZE, sample_steps=12)
    wf.connect(preview, "CONDITIONING", train, "sample_positive")
    wf.connect(ckpt, "VAE", train, "sample_vae")
    wf.group("2. Train LoKr, with previews", [train], TRAIN_COLOR)
    _save(wf, 1120, 60, train, "loras/loralab_lokr", "loralab_lokr_loss")
    wf.note(f"""## LoKr with preview images

**algorithm** LoKr stores each update as a Kronecker product: files are a fraction of a
LoRA's size (a few hundred kB here) and it learns styles well. LoKr usually wants a higher
learning rate than LoRA (1e-3 here; 1e-4–4e-3 in practice). *lokr_factor* -1 picks a balanced
split; *lokr_full_matrix* trains the larger block in full (more capacity, larger file).
Any other algorithm (DoRA, LoHa, OFT, BOFT, GLoRA) is one click away.

**Previews**: every **sample_every** steps the node samples **Preview prompt** with a fixed
**sample_seed** (so previews of different steps compare), decodes it with **sample_vae**, shows
it in the node and saves it under `output/` with the step in its name.
Use *sample_width/height* = your training size (512 / 1024) and *sample_steps* 20 for a real
model; every preview costs about as much time as sample_steps training steps.
{REAL_MODEL_NOTE}""", (20, 700), (620, 640))
    return wf.to_json()


def compare_base_and_lora(object_info: dict) -> dict:
    """4. Train, then the same seed and prompt with and without the LoRA, side by side."""
    wf = UIWorkflow(object_info, "6f1c2a52-8f7e-4a7e-9a51-10ad0000b004")
    ckpt, images, encode, captions = _dataset(wf, 20, 60)
    train = _train(wf, (700, 60), ckpt, images, encode, captions, steps=30, learning_rate=0.001, rank=8, alpha=8.0)
    wf.group("2. Train", [train], TRAIN_COLOR)
    _save(wf, 1120, 60, train, "loras/loralab_compare", "loralab_compare_loss")
    positive, negative = _prompts(wf, 1620, 60, ckpt, "Prompt (both images)")
    latent = wf.add("EmptyLatentImage", (1620, wf.below(negative)), "Image size", {"width": SIZE, "height": SIZE, "batch_size": 1},
                    width=340)
    seed = wf.add("PrimitiveInt", (1620, wf.below(latent)), "Seed (both images)", {"value": 42}, width=340)
    samplers = []
    for i, (source, output, title) in enumerate(((ckpt, "MODEL", "Base model"), (train, "model", "With the LoRA"))):
        sampler = wf.add("KSampler", (2000, 60 + 330 * i), title, {"seed": 42, "steps": 20, "cfg": 5.0,
                         "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0})
        wf.connect(source, output, sampler, "model")
        wf.connect(positive, "CONDITIONING", sampler, "positive")
        wf.connect(negative, "CONDITIONING", sampler, "negative")
        wf.connect(latent, "LATENT", sampler, "latent_image")
        wf.connect(seed, "INT", sampler, "seed")
        decode = wf.add("VAEDecode", (2360, 60 + 330 * i), f"Decode ({title.lower()})", width=220)
        wf.connect(sampler, "LATENT", decode, "samples")
        wf.connect(ckpt, "VAE", decode, "vae")
        samplers += [sampler, decode]
    stitch = wf.add("ImageStitch", (2620, 60), "Side by side: base | LoRA", {"direction": "right",
                    "match_image_size": True, "spacing_width": 0, "spacing_color": "white"})
    wf.connect(samplers[1], "IMAGE", stitch, "image1")
    wf.connect(samplers[3], "IMAGE", stitch, "image2")
    image = wf.add("SaveImage", (2620, 260), "Base | LoRA", {"filename_prefix": "loralab_compare"})
    image.size = (420, 300)
    wf.connect(stitch, "IMAGE", image, "images")
    wf.group("4. Same prompt and seed: base model (left) and with the LoRA (right)",
             [positive, negative, latent, seed, *samplers, stitch, image], CHECK_COLOR)
    wf.note(f"""## Train, then compare with and without the LoRA

After training, two KSamplers sample the same **Prompt** with the same **Seed**: one on the base
model, one on **Train LoRA**'s *model* output (the base model with the new LoRA applied).
**Image Stitch** puts them side by side, base on the left, and **Save Image** writes the pair to
`output/loralab_compare_*.png`. The difference is what the LoRA learned.

- Change the seed (or set it to *randomize*) to compare on other images.
- To compare a LoRA from a file instead, use ComfyUI's **LoraLoaderModelOnly** on the base model
  in place of the Train LoRA output.
- Negative prompt and cfg are shared by both samplers; keep them equal for a fair comparison.
{REAL_MODEL_NOTE}""", (20, 560), (620, 600))
    return wf.to_json()


TEMPLATES = {
    "loralab_basic_lora": basic_lora,
    "loralab_continue_training": continue_training,
    "loralab_lokr_previews": lokr_previews,
    "loralab_compare_base_and_lora": compare_base_and_lora,
}
# Headlines for the thumbnails (the template browser itself shows the file name).
TITLES = {
    "loralab_basic_lora": "Train a LoRA from captioned images",
    "loralab_continue_training": "Continue training a saved LoRA",
    "loralab_lokr_previews": "LoKr, with previews while it trains",
    "loralab_compare_base_and_lora": "Train, then base vs LoRA side by side",
}


def write_templates(object_info: dict, folder: Path = TEMPLATE_DIR) -> list[Path]:
    """Writes every template as ``<name>.json`` into ``folder``."""
    paths = []
    for name, build in TEMPLATES.items():
        path = folder / f"{name}.json"
        path.write_text(json.dumps(build(object_info), indent=1) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--object-info", type=Path, help="a saved /object_info (default: start a ComfyUI)")
    args = parser.parse_args(argv)
    if args.object_info:
        object_info = json.loads(args.object_info.read_text())
    else:
        import tempfile

        from .comfy_host import ComfyServer, make_base_directory
        from .fixtures import install_example_lora, motif_dataset, tiny_checkpoint
        with tempfile.TemporaryDirectory() as tmp:
            base = make_base_directory(Path(tmp), [tiny_checkpoint()], {DATASET_NAME: motif_dataset()})
            install_example_lora(base)
            with ComfyServer(base) as server:
                object_info = server.get_json("/object_info")
    for path in write_templates(object_info):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
