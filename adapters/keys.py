"""Key styles of adapter files, and mapping any supported style back to model layers.

- ``kohya`` (default, what A1111, Forge, civitai and diffusers read): ``lora_unet_<name>`` with
  the name's dots as underscores, as kohya sd-scripts writes it. For SD1.x/2.x, which kohya trains
  as a diffusers UNet, the name is the *diffusers* module path
  (``down_blocks_0_attentions_0_proj_in``); for SDXL, which kohya trains with the original module
  layout, and for DiT families it is the model's own module path (``input_blocks_4_1_proj_in``).
  Files with either naming are read back for any UNet family.
- ``comfyui``: ``diffusion_model.<module path>`` (ComfyUI's native trainer writes this).
Suffixes (``.lora_up.weight``, ``.alpha``, ``.hada_w1_a`` ...) are the same in both.
"""
from __future__ import annotations

import torch

import comfy.utils

COMFY_PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"
KEY_STYLES = ("kohya", "comfyui")
DEFAULT_KEY_STYLE = "kohya"
# Text-encoder parts of kohya-style and diffusers files (kohya trains the text encoder by default).
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lycoris_te_", "lycoris_te1_",
                         "lycoris_te2_", "text_encoder.", "text_encoder_2.", "text_encoders.")


def text_encoder_part(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a file that adapt a text encoder: LoRA Lab trains the diffusion model only,
    so a continued file keeps them as they are."""
    return {k: v for k, v in tensors.items() if k.startswith(TEXT_ENCODER_PREFIXES)}


def _named_by_own_path(model) -> bool:
    """SDXL-family UNets: kohya's SDXL model keeps the original (ldm) module paths."""
    import comfy.model_base
    return isinstance(model, (comfy.model_base.SDXL, comfy.model_base.SDXLRefiner))


def diffusers_layer_names(model, layer_names) -> dict[str, str]:
    """{model layer path: ``lora_unet_`` + diffusers path} for the layers of a UNet family that
    have a diffusers name; empty for other families."""
    config = getattr(getattr(model, "model_config", None), "unet_config", None) or {}
    if "num_res_blocks" not in config:
        return {}
    by_model_key = {comfy_key: diff_key for diff_key, comfy_key in comfy.utils.unet_to_diffusers(config).items()}
    return {layer: KOHYA_PREFIX + by_model_key[f"{layer}.weight"][: -len(".weight")].replace(".", "_")
            for layer in layer_names if f"{layer}.weight" in by_model_key}


def kohya_layer_names(model, layer_names) -> dict[str, str]:
    """{model layer path: kohya base name} for the given layers of a ComfyUI BaseModel."""
    diffusers = {} if _named_by_own_path(model) else diffusers_layer_names(model, layer_names)
    return {layer: diffusers.get(layer) or KOHYA_PREFIX + layer.replace(".", "_") for layer in layer_names}


def split_comfy_key(key: str, modules) -> tuple[str | None, str]:
    """('input_blocks.1.1.proj_in', 'lora_up.weight') for a ComfyUI-style key; (None, '') if no layer."""
    if not key.startswith(COMFY_PREFIX):
        return None, ""
    rest = key[len(COMFY_PREFIX):]
    parts = rest.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        layer = ".".join(parts[:cut])
        if layer in modules:
            return layer, ".".join(parts[cut:])
    return None, ""


def to_key_style(tensors: dict[str, torch.Tensor], style: str, kohya_names: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """Renames ComfyUI-style keys to ``style``; ``kohya_names`` maps layer path -> kohya name."""
    if style not in KEY_STYLES:
        raise ValueError(f"key_style '{style}' is unknown; choose one of {', '.join(KEY_STYLES)}")
    if style == "comfyui":
        return dict(tensors)
    if not kohya_names:
        raise ValueError("key_style 'kohya' needs the layer names of the trained model; this LoRA came "
                         "without them (e.g. from ComfyUI's native trainer): save it with key_style 'comfyui'")
    out = text_encoder_part(tensors)  # already named as their file named them
    by_length = sorted(kohya_names, key=len, reverse=True)
    for key, tensor in tensors.items():
        if key in out:
            continue
        rest = key[len(COMFY_PREFIX):] if key.startswith(COMFY_PREFIX) else key
        layer = next((l for l in by_length if rest.startswith(l + ".")), None)
        if layer is None:
            raise ValueError(f"key '{key}' names no trained layer, so it cannot be written in kohya style")
        out[f"{kohya_names[layer]}.{rest[len(layer) + 1:]}"] = tensor
    return out


def to_comfy_keys(tensors: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module],
                  kohya_names: dict[str, str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Any supported style -> ComfyUI-style keys for this model; also the keys that matched no layer.

    Accepts ``diffusion_model.*`` (ours, ComfyUI's native trainer), ``lora_unet_*`` with diffusers
    names or with the model's own path (kohya and tools that follow it), and ``lycoris_*``.
    ``kohya_names`` maps layer paths to any further names to accept (``diffusers_layer_names``).
    """
    by_kohya = {name: layer for layer, name in kohya_names.items()}
    own_path = {KOHYA_PREFIX + layer.replace(".", "_"): layer for layer in modules if layer}
    out, unmatched = {}, []
    for key, tensor in tensors.items():
        layer, suffix = None, ""
        if key.startswith(COMFY_PREFIX):
            layer, suffix = split_comfy_key(key, modules)
        elif "." in key:
            base, suffix = key.split(".", 1)
            if base.startswith("lycoris_"):
                base = KOHYA_PREFIX + base[len("lycoris_"):]
            layer = by_kohya.get(base) or own_path.get(base)
        if layer is None:
            unmatched.append(key)
        else:
            out[f"{COMFY_PREFIX}{layer}.{suffix}"] = tensor
    return out, sorted(unmatched)
