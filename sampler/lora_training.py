"""One adapter training run on a ComfyUI model: set up, train, hand back model + adapter.

Keeps the node thin: the node validates widget values and resolves files; this module wires the
adapters, the training set and the TrainSampler onto a clone of the user's ModelPatcher, and
guarantees the training-only patches (checkpointing) never outlive the run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

import comfy.model_management

from ..adapters.attach import attach_bypass, attach_weight_wrappers, bypass_hooks, with_lora_patches
from ..adapters.cpu_kernels import onednn_matmul_is_faster
from ..adapters.keys import diffusers_layer_names, kohya_layer_names, text_encoder_part, to_comfy_keys
from ..adapters.metadata import LoraStateDict, base_family, base_model_name, steps_from_metadata, training_metadata
from ..adapters.network import AdapterNetwork
from ..adapters.registry import ALGORITHM_OPTIONS
from ..adapters.targets import DEFAULT_PRESET, select_targets
from .attention import use_fused_attention
from .bf16_weights import Bf16Weights
from .checkpointing import attach_checkpointing
from .frozen_layers import CONVS, attach_frozen_layers, frozen_forward
from .inplace_guard import attach_norm_guard
from .dtypes import resolve_lora_dtype, resolve_training_dtype
from .previews import RunPreviews, show_on_node
from .run_checkpoints import RunCheckpoints
from .run_outputs import CheckpointSettings, SampleSettings, TrainingEvents
from .train_sampler import StepReport, TrainConfig, TrainSampler
from .training_set import TrainingSet

log = logging.getLogger("loralab")


@dataclass
class ExistingAdapter:
    """An adapter file to continue from, with its optional resumable training state."""
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    train_state: tuple | None = None
    name: str = "existing_lora"


@dataclass
class LoraTrainingRequest:
    config: TrainConfig = field(default_factory=TrainConfig)
    algorithm: str = "lora"
    rank: int = 8
    alpha: float = 1.0
    algorithm_options: dict = field(default_factory=dict)
    training_dtype: str = "auto"
    lora_dtype: str = "auto"
    gradient_checkpointing: bool = True
    checkpoint_depth: int = 1
    bypass_mode: bool = True
    offloading: bool = False
    target_layers: str = DEFAULT_PRESET
    include_pattern: str = ""
    exclude_pattern: str = ""
    train_norm_bias: bool = False
    existing: ExistingAdapter | None = None
    captions: list[str] | None = None
    samples: SampleSettings | None = None  # preview images during the run
    checkpoints: CheckpointSettings | None = None  # periodic / on-interrupt resumable checkpoints


@dataclass
class LoraTrainingResult:
    model: object  # ModelPatcher clone with the trained adapters attached
    lora: LoraStateDict
    losses: list[float]
    total_steps: int
    network: AdapterNetwork
    samples: list = field(default_factory=list)  # paths of the preview images saved during the run
    checkpointing: str = ""  # which pieces gradient checkpointing recomputed, as logged


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


def load_for_training(model_patcher, offload: bool) -> None:
    """Loads the patcher on its device: fully, or with offloading, where ComfyUI's own low-VRAM
    loader keeps the base weights in RAM and casts each layer's weights to the device as the
    forward reaches it (block by block)."""
    mm = comfy.model_management
    if not offload:
        mm.load_models_gpu([model_patcher], force_full_load=True)
        return
    for i in reversed(range(len(mm.current_loaded_models))):
        if model_patcher.is_clone(mm.current_loaded_models[i].model):
            mm.current_loaded_models.pop(i).model_unload()
    loaded = mm.LoadedModel(model_patcher)
    loaded.model_load(lowvram_model_memory=1)  # a 1-byte budget: every weight streams
    mm.current_loaded_models.insert(0, loaded)


def ensure_loaded(model_patcher, offload: bool) -> None:
    """Loads the training patcher again if something (a VAE decode on a full device) unloaded it:
    unloading ejects the adapter hooks, and training on would silently train nothing."""
    if any(loaded.model is model_patcher for loaded in comfy.model_management.current_loaded_models):
        return
    log.warning("LoRA Lab: the training model was unloaded (device memory was needed); loading it again")
    load_for_training(model_patcher, offload)
    replace_inference_tensors(model_patcher.model.diffusion_model)
    freeze(model_patcher.model)


def freeze(model: torch.nn.Module) -> None:
    """Base weights never need gradients: ComfyUI loads them with requires_grad=True, and autograd
    would otherwise build a full-size weight gradient for every layer on every step."""
    for param in model.parameters():
        param.requires_grad_(False)
        param.grad = None


def attach(model_patcher, network: AdapterNetwork, bypass: bool, strength: float = 1.0) -> None:
    """Adapters as forward hooks (bypass) or as weight wrappers."""
    (attach_bypass if bypass else attach_weight_wrappers)(model_patcher, network, strength)


def attach_for_training(model_patcher, network: AdapterNetwork, bypass: bool) -> set[str]:
    """Adapters as in ``attach``; in bypass mode every other Linear/Conv runs as a frozen layer too
    (see frozen_layers). Returns the names of the layers whose forward bypass mode replaced."""
    if not bypass:
        attach_weight_wrappers(model_patcher, network)
        return set()
    if model_patcher.load_device.type == "cpu":  # measured now, not inside the first forward (and its FLOP count)
        onednn_matmul_is_faster()
    attach_bypass(model_patcher, network, base_forward_of=frozen_forward)
    hooked = set(bypass_hooks(network, model_patcher.model.diffusion_model))
    attach_frozen_layers(model_patcher, skip=hooked)
    return hooked


def bf16_weights_for(model_patcher, network: AdapterNetwork, dtype: torch.dtype,
                     request: LoraTrainingRequest) -> Bf16Weights:
    """The frozen layers a bf16 bypass run holds as bf16 for its steps (see bf16_weights): every
    Linear/Conv but those whose adapter reads the base weight. No layers in other runs: fp32 needs
    no cast, fp16 cannot be split off fp32 bits, and weight wrappers and offloading read the stored
    weight."""
    dm = model_patcher.model.diffusion_model
    if dtype != torch.bfloat16 or not request.bypass_mode or request.offloading:
        return Bf16Weights(dm, [], model_patcher.load_device)
    readers = {name for name, adapter in network.items() if adapter.reads_base_weight}
    layers = [m for name, m in dm.named_modules() if isinstance(m, (torch.nn.Linear, *CONVS)) and name not in readers]
    return Bf16Weights(dm, layers, model_patcher.load_device)


def load_existing(model, existing: ExistingAdapter, *, dtype, device) -> AdapterNetwork:
    """The network stored in a file of any supported key style; errors list what did not fit."""
    modules = dict(model.diffusion_model.named_modules())
    # every layer with its own weights: adapters sit on Linear/Conv, norm/bias offsets on norms too
    layers = [n for n, m in modules.items() if next(m.parameters(recurse=False), None) is not None]
    text_encoder = text_encoder_part(existing.tensors)  # kept as they are (see _lora_state)
    tensors = {k: v for k, v in existing.tensors.items() if k not in text_encoder}
    if text_encoder and not tensors:
        raise ValueError(f"existing_lora '{existing.name}' adapts only the text encoder, and LoRA Lab trains the "
                         "diffusion model: pick a LoRA with diffusion-model layers, or [None] to start fresh")
    broken = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v.float()).all()))
    if broken:
        raise ValueError(f"existing_lora '{existing.name}' holds NaN or infinite values in {len(broken)} tensors "
                         f"({', '.join(broken[:3])}): it comes from a run that diverged. Pick an earlier checkpoint "
                         "of that run, or [None] to start fresh")
    comfy_keys, unmatched = to_comfy_keys(tensors, modules, diffusers_layer_names(model, layers))
    try:
        network, unfit = AdapterNetwork.from_state_dict(modules, comfy_keys, dtype=dtype, device=device)
    except ValueError as e:
        raise ValueError(f"existing_lora '{existing.name}': {e}. Pick a file LoRA Lab can continue, or [None] "
                         "to start fresh") from e
    unmatched += unfit
    if len(network) == 0 or unmatched:
        shown = ", ".join(unmatched[:8]) or "(no adapter keys at all)"
        raise ValueError(
            f"existing_lora '{existing.name}' does not fit this model: {len(unmatched)} of {len(tensors)} "
            f"keys matched no layer ({shown}). Pick a LoRA made for this base model, or [None] to start fresh")
    return network


def _new_network(model, request: LoraTrainingRequest, *, dtype, device) -> AdapterNetwork:
    dm = model.diffusion_model
    targets = select_targets(dm, request.target_layers, request.include_pattern, request.exclude_pattern)
    return AdapterNetwork.create(targets, request.algorithm, request.rank, request.alpha, dtype=dtype, device=device,
                                 seed=request.config.seed, offsets_of=dm if request.train_norm_bias else None,
                                 **request.algorithm_options)


def train_lora(model_patcher, latents, positive, request: LoraTrainingRequest,
               on_step: Callable[[StepReport], None] | None = None,
               events: TrainingEvents | None = None) -> LoraTrainingResult:
    """Trains adapters on ``model_patcher`` (left unchanged) and returns the result."""
    started = time.time()
    events = events or TrainingEvents()
    # Checked before any work, so a bad prefix or preview size fails at once, not after training.
    checkpoints = RunCheckpoints(request.checkpoints) if request.checkpoints is not None else None
    previews = RunPreviews(request.samples, _output_directory()) if request.samples is not None else None
    device = model_patcher.load_device
    dtype, reason = resolve_training_dtype(request.training_dtype, device)
    saved_dtype = resolve_lora_dtype(request.lora_dtype, dtype)
    log.info("LoRA Lab: training in %s (%s); adapter master weights in float32, saved in %s",
             str(dtype).replace("torch.", ""), reason, str(saved_dtype).replace("torch.", ""))

    train_mp = model_patcher.clone()
    use_fused_attention(train_mp)
    # What the model computes in: the manual-cast dtype where ComfyUI set one (weights stored in
    # one dtype, computed in another), else the storage dtype.
    if dtype != (train_mp.model.manual_cast_dtype or train_mp.model_dtype()):
        train_mp.set_model_compute_dtype(dtype)
    existing = request.existing
    with torch.inference_mode(False):
        if existing is None:
            # fp32 master weights whatever lora_dtype says: optimizer state in 16 bits underflows
            # (Adam's squared gradients in fp16) or rounds small updates away (bf16)
            network = _new_network(train_mp.model, request, dtype=torch.float32, device=device)
        else:
            network = load_existing(train_mp.model, existing, dtype=torch.float32, device=device)
            _report_what_the_file_decides(request, network)
        network.requires_grad_(True)
        log.info("LoRA Lab: training %s on %d layers%s, %d parameters", network.algorithm, len(network),
                 f" + {len(network.offsets)} norm/bias offsets" if len(network.offsets) else "",
                 network.trainable_parameter_count())
        hooked = attach_for_training(train_mp, network, request.bypass_mode)
        attach_norm_guard(train_mp)  # norms whose input the model adds to in place (Flux) get a copy
        plan = None
        if request.gradient_checkpointing:
            plan = attach_checkpointing(train_mp, skip=hooked, depth=request.checkpoint_depth)
        checkpointing = ""
        if request.offloading and not request.bypass_mode:
            raise ValueError("offloading needs bypass_mode: weight wrappers would rebuild every streamed weight")
        load_for_training(train_mp, request.offloading)
        replace_inference_tensors(train_mp.model.diffusion_model)
        freeze(train_mp.model)
        bf16_weights = bf16_weights_for(train_mp, network, dtype, request)
        try:
            data = TrainingSet(train_mp.model, latents, positive, device)
            held = bf16_weights.hold()
            if held:
                log.info("LoRA Lab: %d frozen layers hold their fp32 weights as bf16 for the run (no cast per step)",
                         held)

            def lora_now(steps: int) -> LoraStateDict:
                return _lora_state(model_patcher, request, network, data, sampler, started, steps, dtype)

            def report_step(report: StepReport) -> None:
                events.step(report)  # first: on_step may raise ComfyUI's interrupt (its progress hook does)
                if on_step is not None:
                    on_step(report)
                step = report.completed  # global: steps of a continued LoRA count too
                if checkpoints is not None and checkpoints.due(step):
                    path, message = checkpoints.save_periodic(step, lora_now(step))
                    events.checkpoint(step, str(path), "periodic", message)
                if previews is not None and previews.due(step):
                    with bf16_weights.released():  # sampling may unload and reload the model
                        path, image = previews.make(train_mp, step)
                        ensure_loaded(train_mp, request.offloading)
                    events.sample(step, str(path), image)
                    show_on_node(image, report.step, report.total)

            config = dataclasses.replace(request.config, compute_dtype=dtype)
            sampler = TrainSampler(train_mp, network.named_trainables(), data, config, report_step)
            if plan is not None:
                checkpointing = plan.measure(sampler.probe_forward)
                log.info("LoRA Lab: gradient checkpointing at depth %d: %s", request.checkpoint_depth, checkpointing)
            previous_steps = steps_from_metadata(existing.metadata) if existing else 0
            if not (existing is not None and existing.train_state is not None and _restore(sampler, existing)):
                sampler.completed_steps = previous_steps
            events.started(request.config.steps, sampler.completed_steps)
            train_start = time.perf_counter()
            try:
                losses = sampler.run()
            except comfy.model_management.InterruptProcessingException:
                try:
                    if checkpoints is not None and checkpoints.settings.on_interrupt:
                        _checkpoint_on_interrupt(checkpoints, sampler, request, lora_now, events)
                except Exception:
                    events.finished("error")
                    raise
                events.finished("interrupted")
                raise
            except Exception:
                events.finished("error")
                raise
            elapsed = time.perf_counter() - train_start
            log.info("LoRA Lab: %d steps in %.1fs (%.2f s/step), loss %.4f -> %.4f", len(losses), elapsed,
                     elapsed / max(1, len(losses)), losses[0], losses[-1])
        finally:
            bf16_weights.release()
            release_patcher(train_mp)
        network.requires_grad_(False)

    total_steps = previous_steps + request.config.steps
    lora = _lora_state(model_patcher, request, network, data, sampler, started, total_steps, dtype)
    out_mp = with_lora_patches(model_patcher, lora)
    events.finished("finished")
    return LoraTrainingResult(out_mp, lora, losses, total_steps, network, list(previews.saved) if previews else [],
                              checkpointing)


def _output_directory() -> str:
    import folder_paths
    return folder_paths.get_output_directory()


def _lora_state(model_patcher, request: LoraTrainingRequest, network: AdapterNetwork, data: TrainingSet,
                sampler: TrainSampler, started: float, steps: int, dtype) -> LoraStateDict:
    """The LORA_MODEL value of the network as it is now: tensors, metadata for ``steps`` trained,
    kohya layer names and the resumable training state (the same for checkpoints and the result)."""
    first = network.layers[0]
    target_layers, algorithm_options = _trained_layout(request, network)
    metadata = training_metadata(
        algorithm=network.algorithm, rank=network.rank, alpha=float(getattr(first, "alpha", request.alpha)),
        steps=steps, learning_rate=request.config.learning_rate, base_model=base_model_name(model_patcher),
        resolutions=[(s[-1] * 8, s[-2] * 8) for s in data.shapes], dataset_size=data.size,
        optimizer=request.config.optimizer, loss_function=request.config.loss_function,
        batch_size=request.config.batch_size, seed=request.config.seed, training_dtype=dtype,
        target_layers=target_layers, started_at=started, captions=request.captions,
        algorithm_options=algorithm_options, norm_bias=len(network.offsets) > 0,
        lr_scheduler=request.config.lr_scheduler, lr_warmup_steps=request.config.lr_warmup_steps,
        max_grad_norm=request.config.max_grad_norm, family=base_family(model_patcher))
    # a continued file's text-encoder layers are carried into every save unchanged
    carried = text_encoder_part(request.existing.tensors) if request.existing else {}
    saved = network.to_state_dict(dtype=resolve_lora_dtype(request.lora_dtype, dtype))
    lora = LoraStateDict({**saved, **carried}, metadata)
    lora.kohya_names = kohya_layer_names(model_patcher.model, network.names + [l for (l, _), _ in network.offsets.items()])
    lora.train_state = sampler.capture_state(_fingerprint(request, network))
    return lora


def _report_what_the_file_decides(request: LoraTrainingRequest, network: AdapterNetwork) -> None:
    """A continued adapter is the file's: widgets that describe another one are ignored, and the
    user is told which (a warning in the log), as are text-encoder layers kept unchanged."""
    existing = request.existing
    first = network.layers[0]
    file_alpha = float(getattr(first, "alpha", request.alpha))
    ignored = []
    if request.algorithm != network.algorithm:
        ignored.append(f"algorithm {request.algorithm} (the file's: {network.algorithm})")
    if request.rank != network.rank:
        ignored.append(f"rank {request.rank} (the file's: {network.rank})")
    if (request.alpha or request.rank) != file_alpha:  # alpha 0 means alpha = rank
        ignored.append(f"alpha {request.alpha:g} (the file's: {file_alpha:g})")
    if request.train_norm_bias != bool(len(network.offsets)):
        ignored.append(f"train_norm_bias {request.train_norm_bias}")
    file_targets = existing.metadata.get("loralab_target_layers")
    if (file_targets and request.target_layers != file_targets) or request.include_pattern or request.exclude_pattern:
        ignored.append(f"target_layers {request.target_layers}" + (" and the patterns" if request.include_pattern
                                                                   or request.exclude_pattern else ""))
    if ignored:
        log.warning("LoRA Lab: existing_lora '%s' decides the adapter, so these inputs are ignored: %s. Pick [None] "
                    "as existing_lora to train a new adapter with them", existing.name, "; ".join(ignored))
    kept = text_encoder_part(existing.tensors)
    if kept:
        log.info("LoRA Lab: keeping the %d text-encoder tensors of '%s' unchanged (LoRA Lab trains the diffusion "
                 "model only)", len(kept), existing.name)


def _trained_layout(request: LoraTrainingRequest, network: AdapterNetwork) -> tuple[str, dict]:
    """(target layers, algorithm options) the network was trained with. A continued network comes
    from its file, not from the widgets (which it ignores): its own metadata says, where it has any."""
    if request.existing is None:
        return request.target_layers, request.algorithm_options
    metadata = request.existing.metadata
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        args = {}
    known = ALGORITHM_OPTIONS.get(network.algorithm, {})
    same = isinstance(args, dict) and args.get("algo") == network.algorithm
    options = {k: v for k, v in args.items() if k in known} if same else {}
    return metadata.get("loralab_target_layers") or "from existing_lora", options


def _checkpoint_on_interrupt(checkpoints: RunCheckpoints, sampler: TrainSampler, request: LoraTrainingRequest,
                             lora_now, events: TrainingEvents) -> None:
    """Saves the last completed step of an interrupted run (the sampler has rewound any half-done
    step) and reports where it is and how to continue."""
    done = len(sampler.losses)
    if done == 0:
        log.warning("LoRA Lab: training was interrupted before the first step completed; no checkpoint saved")
        return
    step = sampler.completed_steps
    path, message = checkpoints.save_interrupted(step, lora_now(step), remaining=request.config.steps - done)
    events.checkpoint(step, str(path), "interrupted", message)


def _fingerprint(request: LoraTrainingRequest, network: AdapterNetwork) -> dict:
    return {"optimizer": request.config.optimizer, "algorithm": network.algorithm, "rank": network.rank,
            "batch_size": request.config.batch_size, "seed": request.config.seed}


def _restore(sampler: TrainSampler, existing: ExistingAdapter) -> bool:
    """Restores the file's training state; False (with a warning) when it cannot be used."""
    saved = json.loads(existing.train_state[1].get("fingerprint", "{}"))
    file_steps, state_step = steps_from_metadata(existing.metadata), int(existing.train_state[1].get("step", -1))
    if file_steps and state_step != file_steps:
        log.warning("LoRA Lab: the training state beside '%s' is of step %d but the file of step %d (the file was "
                    "replaced); continuing from the weights only", existing.name, state_step, file_steps)
        return False
    if saved.get("optimizer") != sampler.config.optimizer:
        log.warning("LoRA Lab: training state of '%s' was made with optimizer %s, not %s; continuing from the "
                    "weights only", existing.name, saved.get("optimizer"), sampler.config.optimizer)
        return False
    try:
        sampler.restore_state(existing.train_state)
        log.info("LoRA Lab: restored optimizer state, RNG and data order of '%s' (step %d)", existing.name,
                 sampler.completed_steps)
        return True
    except (ValueError, KeyError, RuntimeError) as e:
        log.warning("LoRA Lab: training state of '%s' does not fit (%s); continuing from the weights only",
                    existing.name, e)
        return False
