"""The benchmark's workload, in process: load the tiny model, encode the data, train one side.

Both sides get the same ModelPatcher, the same 8 latents (one LATENT dict per image) and the same
8 positives (one CONDITIONING per caption), exactly as a ComfyUI graph would hand them over.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from devkit.comfy_path import add_comfyui_to_sys_path

add_comfyui_to_sys_path()

import torch  # noqa: E402

import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

from devkit.fixtures import motif_dataset, tiny_checkpoint  # noqa: E402
from devkit.pack import import_pack  # noqa: E402

import_pack()


@dataclass
class Inputs:
    model: object  # MODEL (ModelPatcher)
    latents: list[dict]  # LATENT per image
    positive: list[list]  # CONDITIONING per image
    size: int
    load_seconds: float


@dataclass
class Settings:
    steps: int
    batch_size: int = 1
    rank: int = 8
    learning_rate: float = 5e-4
    seed: int = 0
    dtype: str = "fp32"  # "fp32", or "default": each side's own default dtypes
    bypass: bool = True  # ours only
    targets: str = ""  # ours only: target preset ("" = its default)
    norm_bias: bool = False  # ours only: also train norm/bias offsets as native always does
    checkpointing: bool = True
    checkpoint_depth: int = 1  # ours only


@dataclass
class Trained:
    step_seconds: list[float]  # every step, first (warm-up) included
    losses: list[float]
    training_dtype: str
    lora_dtype: str
    trainable_params: int
    adapted_layers: int
    extra: dict = field(default_factory=dict)
    model: object = None  # patcher with the trained adapter applied (for evaluation)


def encode_inputs(size: int = 256, count: int = 8) -> tuple[list[dict], list[list]]:
    """The motif images VAE-encoded (one LATENT per image) and their captions CLIP-encoded."""
    from loralab.dataset import load_image_set
    _, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint()), output_vae=True, output_clip=True,
                                                            output_model=False)
    images = load_image_set(motif_dataset(size=size, count=count), "Crop", size, size)
    with torch.inference_mode():
        latents = [{"samples": vae.encode(img[None])} for img in images.images]
        positive = [clip.encode_from_tokens_scheduled(clip.tokenize(c)) for c in images.captions]
    # Plain copies: inference-mode tensors cannot be saved for backward.
    latents = [{"samples": l["samples"].clone()} for l in latents]
    positive = [[[t.clone(), {k: _plain(v) for k, v in extras.items()}] for t, extras in cond] for cond in positive]
    return latents, positive


def save_encoded(path: str, size: int, count: int = 8) -> None:
    latents, positive = encode_inputs(size, count)
    torch.save({"size": size, "latents": latents, "positive": positive}, path)


def load_inputs(size: int = 256, count: int = 8, encoded: str | None = None) -> Inputs:
    """The tiny SD1.5 model, with the data encoded here or read from ``encoded`` (save_encoded's
    file: encoding once for all runs keeps CLIP and the VAE out of the measured processes)."""
    start = time.perf_counter()
    if encoded:
        saved = torch.load(encoded, weights_only=False)
        if saved["size"] != size:
            raise ValueError(f"{encoded} holds {saved['size']} px data, not {size} px")
        latents, positive = saved["latents"], saved["positive"]
    else:
        latents, positive = encode_inputs(size, count)
    model, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint()), output_vae=False, output_clip=False)
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    return Inputs(model, latents, positive, size, time.perf_counter() - start)


def _plain(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# --- ComfyUI's native trainer -------------------------------------------------------------------

def native_defaults() -> dict:
    """The widget defaults of ComfyUI's TrainLoraNode, read from its schema."""
    from comfy_extras.nodes_train import TrainLoraNode
    schema = TrainLoraNode.define_schema()
    return {i.id: i.default for i in schema.inputs if getattr(i, "default", None) is not None}


def train_native(inputs: Inputs, s: Settings) -> Trained:
    """ComfyUI's TrainLoraNode.execute, timed through its ProgressBar (one update per step)."""
    from comfy_extras.nodes_train import TrainLoraNode
    args = native_defaults()
    args.update(batch_size=s.batch_size, steps=s.steps, grad_accumulation_steps=1, learning_rate=s.learning_rate,
                rank=s.rank, seed=s.seed, existing_lora="[None]")
    if s.dtype == "fp32":
        args.update(training_dtype="fp32", lora_dtype="fp32", optimizer="AdamW", loss_function="MSE",
                    algorithm="LoRA", gradient_checkpointing=s.checkpointing)
    stamps: list[float] = []

    def hook(value, total, preview, node_id=None):
        stamps.append(time.perf_counter())

    kwargs = {k: [v] for k, v in args.items()}  # is_input_list: every input is a list
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        start = time.perf_counter()
        out = TrainLoraNode.execute(model=[inputs.model], latents=list(inputs.latents),
                                    positive=list(inputs.positive), **kwargs)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    model, lora_sd, loss_map, _ = out.result
    # Step 1 runs from the call (setup included) to the first update; it is the warm-up and is
    # dropped by the caller. Steps 2.. are the gaps between consecutive updates.
    times = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    trainable = sum(v.numel() for k, v in lora_sd.items() if not k.endswith(".alpha"))
    layers = len({k.rsplit(".", 2)[0] for k in lora_sd if ".lora_" in k})
    comfy.model_management.unload_all_models()  # ejects its weight wrappers from the shared model
    del model
    return Trained(times, list(loss_map["loss"]), args["training_dtype"], args["lora_dtype"], trainable, layers,
                   extra={"lora_sd": lora_sd, "norm_bias_offsets": sum(1 for k in lora_sd if k.endswith((".diff", ".diff_b")))})


def native_patcher(inputs: Inputs, lora_sd: dict):
    """The base model with a native LORA_MODEL applied, as ComfyUI's LoraModelLoader does."""
    patched, _ = comfy.sd.load_lora_for_models(inputs.model, None, dict(lora_sd), 1.0, 0)
    return patched


# --- LoRA Lab ---------------------------------------------------------------------------------------

def ours_request(s: Settings):
    from loralab.sampler.lora_training import LoraTrainingRequest
    from loralab.sampler.train_sampler import TrainConfig
    config = TrainConfig(steps=s.steps, batch_size=s.batch_size, learning_rate=s.learning_rate, optimizer="AdamW",
                         loss_function="MSE", seed=s.seed)
    request = LoraTrainingRequest(config=config, algorithm="lora", rank=s.rank, alpha=1.0,
                                  gradient_checkpointing=s.checkpointing, checkpoint_depth=s.checkpoint_depth,
                                  bypass_mode=s.bypass, train_norm_bias=s.norm_bias)
    if s.targets:
        request.target_layers = s.targets
    if s.dtype == "fp32":
        request.training_dtype, request.lora_dtype = "fp32", "fp32"
    # else: the node's defaults, training_dtype "auto" and lora_dtype "auto" (LoraTrainingRequest's)
    return request


def train_ours(inputs: Inputs, s: Settings) -> Trained:
    """loralab.sampler.lora_training.train_lora, timed per step through on_step."""
    from loralab.sampler.dtypes import resolve_lora_dtype, resolve_training_dtype
    from loralab.sampler.lora_training import train_lora
    request = ours_request(s)
    times: list[float] = []
    result = train_lora(inputs.model, inputs.latents, inputs.positive, request, on_step=lambda r: times.append(r.seconds))
    dtype, _ = resolve_training_dtype(request.training_dtype, inputs.model.load_device)
    lora_dtype = resolve_lora_dtype(request.lora_dtype, dtype)
    params = sum(p.numel() for p in result.network.parameters())
    return Trained(times, list(result.losses), _dtype_name(dtype), _dtype_name(lora_dtype), params,
                   len(result.network), extra={"target_layers": request.target_layers, "bypass": request.bypass_mode,
                                               "norm_bias_offsets": len(result.network.offsets),
                                               "checkpointing": result.checkpointing, "kernels": _kernel_choices()},
                   model=result.model)


def _kernel_choices() -> dict:
    """What this process's CPU kernel probes chose: the matmul kernel (measured once per process)
    and, for each 3x3 conv geometry met, whether Winograd computes it (once per geometry)."""
    from loralab.adapters.cpu_kernels import onednn_matmul_is_faster
    from loralab.sampler.winograd import measured_choices
    return {"onednn_matmul": onednn_matmul_is_faster(), "winograd_3x3": measured_choices()}


def train(side: str, inputs: Inputs, s: Settings) -> Trained:
    return {"native": train_native, "ours": train_ours}[side](inputs, s)


# --- held-out evaluation ------------------------------------------------------------------------------

def heldout(inputs: Inputs, trained_patcher, per_image: int = 4) -> dict:
    """Held-out prediction-space MSE of the base model and of the trained one, on fixed pairs."""
    from loralab.sampler.evaluation import heldout_loss, heldout_pairs
    from loralab.sampler.training_set import TrainingSet
    comfy.model_management.unload_all_models()
    with torch.inference_mode(False):
        data = TrainingSet(inputs.model.model, inputs.latents, inputs.positive, inputs.model.load_device)
        pairs = heldout_pairs(data, per_image=per_image)
        base = heldout_loss(inputs.model, data, pairs)
        comfy.model_management.unload_all_models()
        trained = heldout_loss(trained_patcher, data, pairs)
    comfy.model_management.unload_all_models()
    return {"base": base, "trained": trained, "pairs": sum(len(n) for _, n, _ in pairs)}
