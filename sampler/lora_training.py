"""One LoRA training run on a ComfyUI model: set up, train, hand back model + adapter.

Keeps the node thin: the node validates widget values and resolves files; this module wires the
adapters, the training set and the TrainSampler onto a clone of the user's ModelPatcher, and
guarantees the training-only patches (checkpointing) never outlive the run.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

import comfy.model_management

from ..adapters.attach import attach_bypass
from ..adapters.metadata import LoraStateDict, base_model_name, steps_from_metadata, training_metadata
from ..adapters.network import AdapterNetwork
from ..adapters.targets import DEFAULT_PRESET, select_targets

from .checkpointing import attach_checkpointing
from .dtypes import resolve_lora_dtype, resolve_training_dtype
from .train_sampler import StepReport, TrainConfig, TrainSampler
from .training_set import TrainingSet

log = logging.getLogger("loralab")


@dataclass
class LoraTrainingRequest:
    config: TrainConfig = field(default_factory=TrainConfig)
    algorithm: str = "lora"
    rank: int = 8
    alpha: float = 1.0
    training_dtype: str = "auto"
    lora_dtype: str = "auto"
    gradient_checkpointing: bool = True
    target_layers: str = DEFAULT_PRESET
    existing: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None  # (tensors, metadata)


@dataclass
class LoraTrainingResult:
    model: object  # ModelPatcher clone with the trained adapters attached (bypass)
    lora: LoraStateDict
    losses: list[float]
    total_steps: int
    network: AdapterNetwork


def release_patcher(model_patcher) -> None:
    """Unloads a patcher so its injections are ejected and its weights restored."""
    models = comfy.model_management.current_loaded_models
    for i, loaded in enumerate(list(models)):
        if loaded.model is model_patcher:
            models.pop(i)
            loaded.model_unload()
            return


def replace_inference_tensors(module: torch.nn.Module) -> int:
    """Swaps parameters/buffers created under inference mode for normal copies; returns how many.

    ComfyUI's executor loads checkpoints inside ``torch.inference_mode()``; autograd refuses to
    save such tensors for backward (e.g. a LayerNorm weight whose input needs grad). The copies
    hold the same values, so every other user of the shared model sees no difference.
    """
    count = 0
    with torch.inference_mode(False), torch.no_grad():
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and param.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=False)
                    count += 1
            for name, buf in list(sub._buffers.items()):
                if buf is not None and buf.is_inference():
                    sub._buffers[name] = buf.clone()
                    count += 1
    return count


def _build_network(train_mp, request: LoraTrainingRequest, device, lora_dtype, targets) -> AdapterNetwork:
    if request.existing is None:
        network = AdapterNetwork.create(targets, request.algorithm, request.rank, request.alpha,
                                        dtype=lora_dtype, device=device, seed=request.config.seed)
    else:
        tensors, _ = request.existing
        modules = dict(train_mp.model.diffusion_model.named_modules())
        network, unmatched = AdapterNetwork.from_state_dict(modules, tensors, dtype=lora_dtype, device=device)
        if len(network) == 0 or unmatched:
            shown = ", ".join(unmatched[:8]) or "(no LoRA keys at all)"
            raise ValueError(
                f"existing_lora does not fit this model: {len(unmatched)} keys matched no layer ({shown}). "
                "Pick a LoRA trained on the same base model, or [None] to start fresh")
    network.requires_grad_(True)
    return network


def train_lora(model_patcher, latents, positive, request: LoraTrainingRequest,
               on_step: Callable[[StepReport], None] | None = None) -> LoraTrainingResult:
    """Trains adapters on ``model_patcher`` (left unchanged) and returns the result."""
    started = time.time()
    device = model_patcher.load_device
    dtype, reason = resolve_training_dtype(request.training_dtype, device)
    lora_dtype = resolve_lora_dtype(request.lora_dtype, dtype)
    log.info("LoRA Lab: training in %s (%s); adapter weights in %s", str(dtype).replace("torch.", ""), reason,
             str(lora_dtype).replace("torch.", ""))

    train_mp = model_patcher.clone()
    if dtype != train_mp.model_dtype():
        train_mp.set_model_compute_dtype(dtype)
    targets = select_targets(train_mp.model.diffusion_model, request.target_layers)
    with torch.inference_mode(False):
        network = _build_network(train_mp, request, device, lora_dtype, targets)
        log.info("LoRA Lab: training %d layers (%s), %d parameters", len(network), request.target_layers,
                 network.trainable_parameter_count())
        attach_bypass(train_mp, network)
        if request.gradient_checkpointing:
            attach_checkpointing(train_mp, skip={t.name for t in targets})
        for p in train_mp.model.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
        comfy.model_management.load_models_gpu([train_mp], force_full_load=True)
        replace_inference_tensors(train_mp.model.diffusion_model)
        try:
            data = TrainingSet(train_mp.model, latents, positive, device)
            sampler = TrainSampler(train_mp, network.parameters(), data, request.config, on_step)
            train_start = time.perf_counter()
            losses = sampler.run()
            elapsed = time.perf_counter() - train_start
            log.info("LoRA Lab: %d steps in %.1fs (%.2f s/step), loss %.4f -> %.4f", len(losses), elapsed,
                     elapsed / max(1, len(losses)), losses[0], losses[-1])
        finally:
            release_patcher(train_mp)
        network.requires_grad_(False)

    previous_steps = steps_from_metadata(request.existing[1]) if request.existing else 0
    total_steps = previous_steps + request.config.steps
    resolutions = [(s[-1] * 8, s[-2] * 8) for s in data.shapes]
    metadata = training_metadata(
        algorithm=network.algorithm, rank=network.rank, alpha=float(network.layers[0].alpha),
        steps=total_steps, learning_rate=request.config.learning_rate, base_model=base_model_name(model_patcher),
        resolutions=resolutions, dataset_size=data.size, optimizer=request.config.optimizer,
        loss_function=request.config.loss_function, batch_size=request.config.batch_size,
        seed=request.config.seed, training_dtype=dtype, target_layers=request.target_layers, started_at=started)
    out_mp = model_patcher.clone()
    attach_bypass(out_mp, network)
    lora = LoraStateDict(network.to_state_dict(), metadata)
    return LoraTrainingResult(out_mp, lora, losses, total_steps, network)
