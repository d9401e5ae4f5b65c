"""Cost of each adapter algorithm on the tiny SD1.5 model: parameters, file size, s/step.

Runs in one process on ComfyUI's own loaded model, with the settings of the speed benchmark
(fp32, rank 8, batch 1, gradient checkpointing, 256 px, 8 images), and writes
bench/algorithms.md and bench/algorithms.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from devkit.comfy_path import add_comfyui_to_sys_path  # noqa: E402

add_comfyui_to_sys_path()

import torch  # noqa: E402

import comfy.sd  # noqa: E402

from devkit.fixtures import motif_dataset, tiny_checkpoint  # noqa: E402
from devkit.pack import import_pack  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    import_pack()
    from loralab.adapters.files import save_adapter_file
    from loralab.adapters.keys import to_key_style
    from loralab.dataset import load_image_set
    from loralab.sampler.lora_training import LoraTrainingRequest, train_lora
    from loralab.sampler.train_sampler import TrainConfig

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint()), output_vae=True, output_clip=True)
    images = load_image_set(motif_dataset(size=args.size), "Crop", args.size, args.size)
    with torch.inference_mode():
        latents = [{"samples": vae.encode(img[None])} for img in images.images]
        positive = [clip.encode_from_tokens_scheduled(clip.tokenize(c)) for c in images.captions]
    rows = []
    for name, algorithm in (("LoRA", "lora"), ("DoRA", "dora"), ("LoHa", "loha"), ("LoKr", "lokr"),
                            ("OFT", "oft"), ("BOFT", "boft"), ("GLoRA", "glora")):
        times = []
        request = LoraTrainingRequest(config=TrainConfig(steps=args.steps, learning_rate=1e-4), algorithm=algorithm,
                                      rank=8, alpha=8.0, training_dtype="fp32", gradient_checkpointing=True)
        result = train_lora(model, latents, positive, request, on_step=lambda r: times.append(r.seconds))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "a.safetensors"
            save_adapter_file(path, to_key_style(dict(result.lora), "kohya", result.lora.kohya_names), result.lora.metadata)
            size = path.stat().st_size
        rows.append({"algorithm": name, "layers": len(result.network),
                     "params": result.network.trainable_parameter_count() or sum(p.numel() for p in result.network.parameters()),
                     "file_bytes": size, "s_per_step": statistics.median(times[1:] or times)})
        print(rows[-1], flush=True)
    lines = [f"# Adapter algorithms on the tiny SD1.5 model ({args.size} px, rank 8, fp32, batch 1, checkpointing, "
             f"median of steps 2..{args.steps})", "", "| algorithm | layers | parameters | file size | s/step |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['algorithm']} | {r['layers']} | {r['params']:,} | {r['file_bytes'] / 1e6:.2f} MB | {r['s_per_step']:.2f} |"
              for r in rows]
    (HERE / "algorithms.md").write_text("\n".join(lines) + "\n")
    (HERE / "algorithms.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
