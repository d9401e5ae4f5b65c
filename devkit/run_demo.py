"""The main job: train a LoRA through a real ComfyUI with the pack, on the generated tiny model.

Generates (or reuses) the tiny SD1.5 checkpoint and the motif dataset, starts ComfyUI on
127.0.0.1, converts the basic template to an API prompt, queues it over HTTP, waits, and prints
where the LoRA and the loss graph went and the first/last loss.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .comfy_host import PACK_DIR, ComfyServer, execution_error, make_base_directory
from .fixtures import DATASET_NAME, motif_dataset, tiny_checkpoint
from .workflow_api import nodes_of_type, ui_to_api

TEMPLATE = PACK_DIR / "example_workflows" / "loralab_basic_lora.json"


def saved_files(entry: dict, prompt: dict, class_type: str, key: str, base: Path) -> list[Path]:
    out = []
    for nid in nodes_of_type(prompt, class_type):
        for item in entry.get("outputs", {}).get(nid, {}).get(key, []):
            out.append(base / "output" / item.get("subfolder", "") / item["filename"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=PACK_DIR / "artifacts" / "demo",
                        help="ComfyUI base directory for this run (output/ ends up here)")
    parser.add_argument("--steps", type=int, default=None, help="override the template's training steps")
    args = parser.parse_args(argv)

    t0 = time.monotonic()
    ckpt = tiny_checkpoint()
    data = motif_dataset()
    print(f"[demo] model {ckpt}\n[demo] dataset {data} ({time.monotonic() - t0:.0f}s)", flush=True)
    base = make_base_directory(args.workdir.resolve(), [ckpt], {DATASET_NAME: data})
    workflow = json.loads(TEMPLATE.read_text())
    with ComfyServer(base) as server:
        print(f"[demo] ComfyUI up at {server.url} (log: {server.log_path})", flush=True)
        prompt = ui_to_api(workflow, server.get_json("/object_info"))
        if args.steps:
            for nid in nodes_of_type(prompt, "LoraLab_TrainLora"):
                prompt[nid]["inputs"]["steps"] = args.steps
        entry = server.run_prompt(prompt)
    error = execution_error(entry)
    if error:
        print(f"[demo] FAILED in node {error.get('node_type')}: {error.get('exception_message')}", file=sys.stderr)
        return 1
    loras = saved_files(entry, prompt, "LoraLab_SaveLoRA", "lora_files", base)
    graphs = saved_files(entry, prompt, "LoraLab_LossGraph", "images", base)
    samples = saved_files(entry, prompt, "SaveImage", "images", base)
    losses = [v for nid in nodes_of_type(prompt, "LoraLab_LossGraph") for v in entry["outputs"][nid].get("loss", [])]
    print(f"[demo] saved LoRA:  {loras[0] if loras else 'none'}")
    print(f"[demo] loss graph:  {graphs[0] if graphs else 'none'}")
    print(f"[demo] sample:      {samples[0] if samples else 'none'}")
    if losses:
        print(f"[demo] loss: first {losses[0]:.4f}, last {losses[-1]:.4f} over {len(losses)} steps")
    print(f"[demo] done in {time.monotonic() - t0:.0f}s")
    return 0 if loras and graphs else 1


if __name__ == "__main__":
    sys.exit(main())
