"""API-format graph pieces for the server tests (the same nodes a user wires in the browser)."""
from __future__ import annotations

import json

from devkit.comfy_host import PACK_DIR
from devkit.workflow_api import nodes_of_type, ui_to_api

TEMPLATE = PACK_DIR / "example_workflows" / "loralab_basic_lora.json"
CKPT = "loralab_tiny_sd15.safetensors"


def template_prompt(object_info: dict, **train_inputs) -> dict:
    """The basic template converted to API form, with TrainLora inputs overridden."""
    prompt = ui_to_api(json.loads(TEMPLATE.read_text()), object_info)
    (train,) = nodes_of_type(prompt, "LoraLab_TrainLora")
    prompt[train]["inputs"].update(train_inputs)
    return prompt


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def prediction_nodes(model_ref: list, positive_ref: list, negative_ref: list, prefix: str, id_base: int,
                     size: int = 128) -> dict:
    """The model's x0 prediction for fixed noise at the highest sigma: a 1-step euler KSampler from an
    empty latent (one model evaluation; its output is the denoised estimate), saved as a .latent file."""
    a, b, c = str(id_base), str(id_base + 1), str(id_base + 2)
    return {
        a: node("EmptyLatentImage", width=size, height=size, batch_size=1),
        b: node("KSampler", model=model_ref, positive=positive_ref, negative=negative_ref, latent_image=[a, 0],
                seed=42, steps=1, cfg=1.0, sampler_name="euler", scheduler="normal", denoise=1.0),
        c: node("SaveLatent", samples=[b, 0], filename_prefix=prefix),
    }


def text_nodes(clip_ref: list, id_base: int, text: str = "a photo of lrlb motif") -> tuple[dict, list, list]:
    pos, neg = str(id_base), str(id_base + 1)
    nodes = {pos: node("CLIPTextEncode", clip=clip_ref, text=text), neg: node("CLIPTextEncode", clip=clip_ref, text="")}
    return nodes, [pos, 0], [neg, 0]


def training_prompt(folder: str, steps: int = 1, resize_method: str = "Crop", prefix: str = "loras/t",
                    caption_folder: str | None = None, **train) -> dict:
    """Load folder -> encode -> TrainLora -> SaveLoRA, small and fast; for error cases."""
    prompt = {
        "1": node("CheckpointLoaderSimple", ckpt_name=CKPT),
        "2": node("LoraLab_LoadImageSet", folder=folder, resize_method=resize_method, width=64, height=64,
                  default_caption="a photo", bucketing=False),
        "3": node("VAEEncode", pixels=["2", 0], vae=["1", 2]),
        "4": node("CLIPTextEncode", clip=["1", 1], text=["2", 1]),
        "5": node("LoraLab_TrainLora", model=["1", 0], latents=["3", 0], positive=["4", 0], batch_size=1,
                  grad_accumulation_steps=1, steps=steps, learning_rate=0.001, rank=4, optimizer="AdamW",
                  loss_function="MSE", seed=0, training_dtype="fp32", lora_dtype="auto", algorithm="LoRA",
                  gradient_checkpointing=False, existing_lora="[None]"),
        "6": node("LoraLab_SaveLoRA", lora=["5", 1], prefix=prefix, steps=["5", 3]),
    }
    prompt["5"]["inputs"].update(train)
    if caption_folder is not None:
        prompt["7"] = node("LoraLab_LoadImageSet", folder=caption_folder, resize_method="Crop", width=64, height=64,
                           default_caption="other", bucketing=False)
        prompt["4"]["inputs"]["text"] = ["7", 1]
    return prompt


SD15_LATENT_SCALE = 0.18215


def load_prediction(path):
    """A saved prediction in the model's own latent space (SaveLatent stores it scaled for the VAE)."""
    import safetensors.torch
    return safetensors.torch.load_file(str(path))["latent_tensor"] * SD15_LATENT_SCALE
