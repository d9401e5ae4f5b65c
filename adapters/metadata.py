"""Training facts embedded in saved adapters, in the keys kohya-aware tools display.

A1111, Forge and civitai read kohya's ``ss_*`` keys and ``modelspec.*``; we write those plus a
few ``loralab_*`` keys of our own. ``LoraStateDict`` carries the metadata alongside the tensors
through the graph while still being a plain ``dict`` for ComfyUI's built-in LORA_MODEL nodes.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace

import torch

NETWORK_MODULES = {"lora": "networks.lora"}  # everything else is a LyCORIS algorithm


@dataclass(frozen=True)
class BaseFamily:
    """How kohya-aware tools name a base model: A1111 and Forge pick the model version a LoRA is
    listed under from ``ss_base_model_version`` (an ``sdxl_`` prefix) and ``ss_v2``."""
    version: str  # ss_base_model_version
    architecture: str  # modelspec.architecture, before "/lora"
    v2: bool = False


# ComfyUI model config class, or the parent it derives from -> family (kohya's and ModelSpec's names)
FAMILIES = {
    "SD15": BaseFamily("sd_v1", "stable-diffusion-v1"),
    "SD20": BaseFamily("sd_v2", "stable-diffusion-v2-512", v2=True),
    "SDXLRefiner": BaseFamily("sdxl_refiner_v1-0", "stable-diffusion-xl-v1-refiner"),
    "SDXL": BaseFamily("sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
    "SD3": BaseFamily("sd3", "stable-diffusion-3"),
    "FluxSchnell": BaseFamily("flux1", "flux-1-schnell"),
    "Flux2": BaseFamily("flux2", "flux-2"),
    "Flux": BaseFamily("flux1", "flux-1-dev"),
}


class LoraStateDict(dict):
    """A LORA_MODEL value: tensors by key, plus ``metadata`` (str -> str) for the saver."""

    def __init__(self, tensors=(), metadata: dict[str, str] | None = None):
        super().__init__(tensors)
        self.metadata: dict[str, str] = dict(metadata or {})


def metadata_of(lora) -> dict[str, str]:
    """Metadata of a LORA_MODEL value; empty for a plain dict (e.g. from the native trainer)."""
    return dict(getattr(lora, "metadata", {}) or {})


def base_model_name(model_patcher) -> str:
    """ComfyUI's name for the base model family (e.g. 'SD15'), from its model config."""
    config = getattr(model_patcher.model, "model_config", None)
    return type(config).__name__ if config is not None else type(model_patcher.model).__name__


def base_family(model_patcher) -> BaseFamily:
    """The family of the model's config class or of the first parent in ``FAMILIES`` (SSD-1B and
    other SDXL derivatives are SDXL); SD2 with v-prediction is kohya's sd_v2_v, 768-v."""
    import comfy.model_base
    model = model_patcher.model
    config = getattr(model, "model_config", None)
    for cls in type(config).__mro__ if config is not None else ():
        family = FAMILIES.get(cls.__name__)
        if family is None:
            continue
        if family.v2 and getattr(model, "model_type", None) == comfy.model_base.ModelType.V_PREDICTION:
            family = replace(family, version="sd_v2_v", architecture="stable-diffusion-v2-768-v")
        return family
    name = base_model_name(model_patcher).lower()
    return BaseFamily(name, name)


def steps_from_metadata(metadata: dict[str, str]) -> int:
    """Steps already trained, as recorded by our saver or kohya's (0 when unknown)."""
    for key in ("ss_steps", "loralab_steps"):
        try:
            return int(metadata[key])
        except (KeyError, ValueError):
            continue
    return 0


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """kohya's ss_tag_frequency counts: comma-separated caption parts, counted once per image."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in {t.strip() for t in caption.split(",") if t.strip()}:
            counts[tag] = counts.get(tag, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def training_metadata(*, algorithm: str, rank: int, alpha: float, steps: int, learning_rate: float,
                      base_model: str, resolutions: list[tuple[int, int]], dataset_size: int,
                      optimizer: str, loss_function: str, batch_size: int, seed: int,
                      training_dtype: torch.dtype, target_layers: str, started_at: float | None = None,
                      captions: list[str] | None = None, algorithm_options: dict | None = None,
                      norm_bias: bool = False, lr_scheduler: str = "constant", lr_warmup_steps: int = 0,
                      max_grad_norm: float = 0.0, family: BaseFamily | None = None) -> dict[str, str]:
    """String metadata describing a training run (kohya ``ss_*``, ``modelspec.*``, ``loralab_*``).
    ``base_model`` is ComfyUI's config class name; ``family`` defaults to that class's entry."""
    family = family or FAMILIES.get(base_model) or BaseFamily(base_model.lower(), base_model.lower())
    width, height = max(resolutions, key=lambda r: r[0] * r[1]) if resolutions else (0, 0)
    now = time.time()
    network_args = {"algo": algorithm, **{k: str(v) for k, v in (algorithm_options or {}).items()}}
    if norm_bias:
        network_args["train_norm"] = "True"
    return {
        "ss_network_module": NETWORK_MODULES.get(algorithm, "lycoris.kohya"),
        "ss_network_args": json.dumps(network_args),
        "ss_tag_frequency": json.dumps({"loralab": tag_frequency(captions or [])}),
        "ss_network_dim": str(rank),
        "ss_network_alpha": repr(float(alpha)),
        "ss_steps": str(steps),
        "ss_learning_rate": repr(float(learning_rate)),
        "ss_unet_lr": repr(float(learning_rate)),
        "ss_text_encoder_lr": "0.0",
        "ss_lr_scheduler": lr_scheduler,
        "ss_lr_warmup_steps": str(lr_warmup_steps),
        "ss_max_grad_norm": repr(float(max_grad_norm)),
        "ss_network_train_unet_only": "True",
        "ss_resolution": f"({width}, {height})",
        "ss_bucket_info": json.dumps({"buckets": {str(i): {"resolution": list(r)} for i, r in enumerate(resolutions)}}),
        "ss_num_train_images": str(dataset_size),
        "ss_batch_size_per_device": str(batch_size),
        "ss_optimizer": optimizer,
        "ss_seed": str(seed),
        "ss_mixed_precision": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(training_dtype, "no"),
        "ss_base_model_version": family.version,
        "ss_v2": str(family.v2),
        "ss_training_started_at": repr(float(started_at or now)),
        "ss_training_finished_at": repr(float(now)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family.architecture}/lora",
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": "LoRA Lab adapter",
        "loralab_algorithm": algorithm,
        "loralab_base_model": base_model,
        "loralab_loss_function": loss_function,
        "loralab_target_layers": target_layers,
        "loralab_steps": str(steps),
    }
