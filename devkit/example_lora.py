"""A small LoRA for the tiny SD1.5 checkpoint, trained by the pack itself, so the "continue
training" template (existing_lora) runs as-is on a machine without real models.

It is trained the way the basic template trains (motif images at 128 px with their captions,
AdamW) but for a few steps only, and saved the way Save LoRA saves: kohya key names, the
training metadata, and a ``.trainstate`` beside it so continuing restores the optimizer state.

Built in its own process (``python -m devkit.example_lora --out DIR``) so a test session that
asks for it does not keep a second copy of the model in memory.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

EXAMPLE_LORA_FILENAME = "loralab_tiny_sd15_example.safetensors"
GENERATOR = {"generator": "loralab.example_lora", "version": "2", "steps": 6, "rank": 8, "seed": 0}
STAMP_KEY = "loralab.fixture"


def expected_stamp(checkpoint: pathlib.Path) -> dict:
    """What a current example LoRA records: this generator and the checkpoint it was trained on."""
    from .tiny_model import read_stamp
    return {**GENERATOR, "checkpoint": read_stamp(checkpoint)}


def read_example_stamp(path: pathlib.Path) -> dict | None:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})[STAMP_KEY])
    except Exception:
        return None


def build_example_lora(out_dir: pathlib.Path, checkpoint: pathlib.Path, dataset: pathlib.Path) -> pathlib.Path:
    """Trains and saves the example LoRA (+ .trainstate) into ``out_dir``; returns the LoRA path."""
    from .comfy_path import add_comfyui_to_sys_path
    add_comfyui_to_sys_path()
    from .pack import import_pack
    import_pack()
    import torch
    import comfy.sd
    from loralab.adapters.files import save_adapter_file
    from loralab.adapters.keys import DEFAULT_KEY_STYLE, to_key_style
    from loralab.dataset import load_image_set
    from loralab.sampler import train_state
    from loralab.sampler.lora_training import LoraTrainingRequest, train_lora
    from loralab.sampler.train_sampler import TrainConfig

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=True, output_clip=True)
    images = load_image_set(dataset, "Crop", 128, 128)
    with torch.inference_mode():
        latents = [{"samples": vae.encode(img[None])} for img in images.images]
        positive = [clip.encode_from_tokens_scheduled(clip.tokenize(c)) for c in images.captions]
    request = LoraTrainingRequest(
        config=TrainConfig(steps=GENERATOR["steps"], learning_rate=5e-4, optimizer="AdamW", seed=GENERATOR["seed"]),
        # the Train LoRA node's own defaults (the continue template's), so continuing from this
        # file's training state repeats the uninterrupted run exactly on this machine
        rank=GENERATOR["rank"], alpha=8.0, training_dtype="auto", gradient_checkpointing=True,
        captions=list(images.captions))
    result = train_lora(model, latents, positive, request)
    lora = result.lora
    metadata = dict(lora.metadata, loralab_key_style=DEFAULT_KEY_STYLE,
                    **{STAMP_KEY: json.dumps(expected_stamp(checkpoint), sort_keys=True)})
    path = pathlib.Path(out_dir) / EXAMPLE_LORA_FILENAME
    train_state.save(train_state.state_path_for(path), *lora.train_state)  # first, as Save LoRA does
    save_adapter_file(path, to_key_style(dict(lora), DEFAULT_KEY_STYLE, lora.kohya_names), metadata)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=pathlib.Path, help="folder to write the LoRA into")
    parser.add_argument("--checkpoint", required=True, type=pathlib.Path, help="the tiny SD1.5 checkpoint")
    parser.add_argument("--dataset", required=True, type=pathlib.Path, help="the captioned motif image folder")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = build_example_lora(args.out, args.checkpoint, args.dataset)
    print(f"{path} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
