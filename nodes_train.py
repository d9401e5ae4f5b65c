"""LoRA Lab node classes (ComfyUI V3 schema). Thin: read widgets, validate, call the packages."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from .adapters.attach import with_lora_patches
from .adapters.files import check_name_fits, load_adapter_file, next_lora_path
from .adapters.keys import DEFAULT_KEY_STYLE, KEY_STYLES
from .adapters.registry import ALGORITHM_OPTIONS, ALGORITHMS
from .adapters.targets import DEFAULT_PRESET, PRESETS
from .sampler import train_state
from .report.loss_plot import render_loss_plot
from .report.live import LiveTrainingEvents, finite_or_none
from .sampler.dtypes import DTYPE_CHOICES
from .sampler.schedules import SCHEDULERS
from .sampler.lora_training import ExistingAdapter, LoraTrainingRequest, train_lora
from .sampler.objective import LOSS_FUNCTIONS
from .sampler.run_checkpoints import save_lora
from .sampler.run_outputs import CheckpointSettings, SampleSettings
from .node_inputs import first as _first
from .sampler.optimizers import OPTIMIZERS
from .sampler.train_sampler import TrainConfig
from .nodes_dataset import LoadImageSet, ImageSetFromImages

CATEGORY = "LoRA Lab"
NO_LORA = "[None]"
log = logging.getLogger("loralab")


# The names ComfyUI's native trainer shows, so workflows and habits carry over.
ALGORITHM_CHOICES = {"LoRA": "lora", "DoRA": "dora", "LoHa": "loha", "LoKr": "lokr", "OFT": "oft", "BOFT": "boft",
                     "GLoRA": "glora"}
assert set(ALGORITHM_CHOICES.values()) == set(ALGORITHMS)


def _load_existing(name: str) -> ExistingAdapter | None:
    """The adapter file chosen as existing_lora, with its .trainstate sidecar when there is one."""
    if name == NO_LORA:
        return None
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise ValueError(f"existing_lora '{name}' was not found in models/loras or output/loras; refresh the node "
                         "(press R) or pick [None]")
    if not path.lower().endswith(".safetensors"):
        raise ValueError(f"existing_lora '{name}' is not a .safetensors file; LoRA Lab continues .safetensors "
                         "files only: convert it to .safetensors first, or pick [None]")
    try:
        tensors, metadata = load_adapter_file(path)
    except Exception as e:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"existing_lora '{name}' cannot be read ({e}): the file is damaged or incomplete; "
                         "pick another file, or [None]") from e
    state_path = train_state.state_path_for(path)
    try:
        state = train_state.load(state_path)
    except Exception as e:
        log.warning("LoRA Lab: the training state '%s' cannot be read (%s); continuing '%s' from its weights only",
                    state_path.name, e, name)
        state = None
    return ExistingAdapter(tensors, metadata, state, name)


class TrainLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoraLab_TrainLora",
            display_name="Train LoRA (LoRA Lab)",
            category=CATEGORY,
            description="Trains a LoRA on the given latents and captions and returns the model with it applied.",
            is_input_list=True,
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to train the LoRA on."),
                io.Latent.Input("latents", tooltip="Training images, VAE-encoded. Images of different sizes are trained in per-size buckets."),
                io.Conditioning.Input("positive", tooltip="One conditioning per image (encoded captions), or one for all images."),
                io.Int.Input("batch_size", default=1, min=1, max=10000, tooltip="Images per step (capped at the size of a bucket; a bucket's last batch of an epoch can be short)."),
                io.Int.Input("grad_accumulation_steps", default=1, min=1, max=1024, tooltip="Micro-batches per optimizer step; their gradients are averaged, so k micro-batches of batch_size train like one batch of k * batch_size."),
                io.Int.Input("steps", default=16, min=1, max=100000, tooltip="Optimizer steps to train."),
                io.Float.Input("learning_rate", default=0.0005, min=0.0000001, max=1.0, step=0.0000001, tooltip="Learning rate."),
                io.Int.Input("rank", default=8, min=1, max=128, tooltip="LoRA rank (dimension)."),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="AdamW",
                               tooltip="AdamW is the usual choice; Adam, SGD and RMSprop are also offered."),
                io.Combo.Input("loss_function", options=list(LOSS_FUNCTIONS), default="MSE",
                               tooltip="How the model's prediction is compared with its target (noise for SD1.5/SDXL, v or flow velocity for others): MSE (usual), L1, Huber or SmoothL1."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seeds adapter init, image order, noise and timesteps."),
                io.Combo.Input("training_dtype", options=list(DTYPE_CHOICES), default="auto",
                               tooltip="Compute dtype. auto picks bf16 only where the device runs it fast (fp32 on CPUs without bf16 instructions)."),
                io.Combo.Input("lora_dtype", options=["auto", "fp32", "bf16", "fp16"], default="auto",
                               tooltip="The dtype the LoRA is saved and returned in (fp16/bf16 halve the file). It always trains on fp32 master weights; auto saves fp32."),
                io.Combo.Input("algorithm", options=list(ALGORITHM_CHOICES), default="LoRA",
                               tooltip="LoRA, DoRA (LoRA with weight decomposition), LoHa, LoKr, OFT, BOFT or GLoRA."),
                io.Boolean.Input("gradient_checkpointing", default=True, tooltip="Recompute activations in the backward pass to save memory."),
                io.Combo.Input("existing_lora", options=folder_paths.get_filename_list("loras") + [NO_LORA], default=NO_LORA,
                               tooltip="Continue training this LoRA (from models/loras or output/loras), or [None] to start fresh."),
                io.Float.Input("alpha", default=1.0, min=0.0, max=1024.0, step=0.01, optional=True,
                               tooltip="LoRA alpha; the update is scaled by alpha/rank. 0 means alpha = rank (no scaling), as in kohya."),
                io.Combo.Input("target_layers", options=list(PRESETS), default=DEFAULT_PRESET, optional=True,
                               tooltip="Which layers get an adapter."),
                io.String.Input("include_pattern", default="", optional=True,
                                tooltip="Regular expression: only layers whose name matches train (e.g. 'attn2')."),
                io.String.Input("exclude_pattern", default="", optional=True,
                                tooltip="Regular expression: layers whose name matches are left out."),
                io.Boolean.Input("train_norm_bias", default=False, optional=True,
                                 tooltip="Also train offsets of norm weights and biases (.diff/.diff_b), as ComfyUI's native trainer always does."),
                io.Boolean.Input("bypass_mode", default=True, optional=True,
                                 tooltip="Run adapters as forward hooks (faster, less memory) instead of rebuilding weights every step."),
                io.Boolean.Input("offloading", default=False, optional=True,
                                 tooltip="Keep base weights in RAM and stream them to the GPU layer by layer (needs bypass_mode)."),
                io.String.Input("captions", optional=True, force_input=True,
                                tooltip="The captions, to record tag frequencies in the file's metadata."),
                io.Int.Input("lokr_factor", default=-1, min=-1, max=64, optional=True,
                             tooltip="LoKr: Kronecker factor of the smaller block; -1 picks a balanced split."),
                io.Boolean.Input("lokr_full_matrix", default=False, optional=True,
                                 tooltip="LoKr: train the larger Kronecker block as a full matrix instead of low rank."),
                io.Boolean.Input("lokr_decompose_both", default=False, optional=True,
                                 tooltip="LoKr: make the smaller block low rank too."),
                io.Float.Input("oft_constraint", default=0.0, min=0.0, max=10.0, step=0.0001, optional=True,
                               tooltip="OFT/BOFT: limit on how far the rotation may move (COFT); 0 = none. For OFT/BOFT, rank is the block size."),
                io.Int.Input("boft_m", default=0, min=0, max=16, optional=True,
                             tooltip="BOFT: number of butterfly factors; 0 picks the most the layer allows."),
                # New inputs go last: saved workflows map widget values by position.
                io.Int.Input("checkpoint_depth", default=1, min=1, max=5, optional=True,
                             tooltip="How fine the checkpointed pieces are: 1 = whole blocks (least memory), higher = smaller pieces (less recompute per piece). Pieces that free little memory for their recompute (measured before step 1) run unchecked."),
                io.Int.Input("sample_every", default=0, min=0, max=100000, optional=True,
                             tooltip="Make a preview image every N steps (0 = never). Needs sample_positive and sample_vae."),
                io.Int.Input("sample_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, optional=True,
                             tooltip="Noise seed of the preview images; fixed, so previews of different steps compare."),
                io.Int.Input("sample_width", default=512, min=64, max=4096, step=8, optional=True,
                             tooltip="Preview width in pixels."),
                io.Int.Input("sample_height", default=512, min=64, max=4096, step=8, optional=True,
                             tooltip="Preview height in pixels."),
                io.Int.Input("sample_steps", default=20, min=1, max=200, optional=True,
                             tooltip="Sampler steps per preview image (euler)."),
                io.Int.Input("save_every", default=0, min=0, max=100000, optional=True,
                             tooltip="Save a resumable checkpoint every N steps (0 = only when interrupted)."),
                io.Int.Input("keep_last", default=3, min=1, max=1000, optional=True,
                             tooltip="How many periodic checkpoints to keep; older ones are deleted."),
                io.String.Input("checkpoint_prefix", default="loras/loralab_checkpoint", optional=True,
                                tooltip="Checkpoint file prefix, relative to the output directory."),
                io.Conditioning.Input("sample_positive", optional=True,
                                      tooltip="Prompt of the preview images (a CLIP Text Encode)."),
                io.Vae.Input("sample_vae", optional=True, tooltip="VAE that decodes the preview images."),
                io.Combo.Input("lr_scheduler", options=list(SCHEDULERS), default="constant", optional=True,
                               tooltip="How the learning rate changes over the run (kohya's names): constant, or decaying to 0 at the last step."),
                io.Int.Input("lr_warmup_steps", default=0, min=0, max=100000, optional=True,
                             tooltip="Steps over which the learning rate rises linearly to learning_rate before the schedule starts."),
                io.Int.Input("lr_scheduler_num_cycles", default=1, min=1, max=1000, optional=True,
                             tooltip="cosine_with_restarts: how many times the cosine restarts from the full rate."),
                io.Float.Input("lr_scheduler_power", default=1.0, min=0.01, max=100.0, step=0.01, optional=True,
                               tooltip="polynomial: the power of the decay (1 = linear)."),
                io.Float.Input("max_grad_norm", default=0.0, min=0.0, max=1000.0, step=0.01, optional=True,
                               tooltip="Clip the adapter's gradient norm to this before each step (kohya uses 1.0); 0 = no clipping."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt, io.Hidden.extra_pnginfo],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the trained LoRA applied."),
                io.LoraModel.Output(display_name="lora", tooltip="The trained LoRA weights."),
                io.LossMap.Output(display_name="loss_map", tooltip="Loss of every step."),
                io.Int.Output(display_name="steps", tooltip="Total steps, including those of existing_lora."),
            ],
        )

    @classmethod
    def execute(cls, model, latents, positive, batch_size, grad_accumulation_steps, steps, learning_rate, rank,
                optimizer, loss_function, seed, training_dtype, lora_dtype, algorithm, gradient_checkpointing,
                existing_lora, alpha=None, target_layers=None, include_pattern=None, exclude_pattern=None,
                train_norm_bias=None, bypass_mode=None, captions=None, lokr_factor=None, lokr_full_matrix=None,
                lokr_decompose_both=None, oft_constraint=None, boft_m=None, checkpoint_depth=None, offloading=None,
                sample_every=None, sample_seed=None, sample_width=None, sample_height=None, sample_steps=None,
                save_every=None, keep_last=None, checkpoint_prefix=None, sample_positive=None, sample_vae=None,
                lr_scheduler=None, lr_warmup_steps=None, lr_scheduler_num_cycles=None, lr_scheduler_power=None,
                max_grad_norm=None):
        existing = _load_existing(_first(existing_lora))
        config = TrainConfig(
            steps=_first(steps), batch_size=_first(batch_size), grad_accumulation_steps=_first(grad_accumulation_steps),
            learning_rate=_first(learning_rate), optimizer=_first(optimizer), loss_function=_first(loss_function),
            seed=_first(seed), lr_scheduler=_first(lr_scheduler) or "constant",
            lr_warmup_steps=_first(lr_warmup_steps) or 0, lr_scheduler_num_cycles=_first(lr_scheduler_num_cycles) or 1,
            lr_scheduler_power=1.0 if lr_scheduler_power is None else _first(lr_scheduler_power),
            max_grad_norm=_first(max_grad_norm) or 0.0)
        chosen = {"factor": lokr_factor, "full_matrix": lokr_full_matrix, "decompose_both": lokr_decompose_both,
                  "constraint": oft_constraint, "boft_m": boft_m}
        algorithm = ALGORITHM_CHOICES[_first(algorithm)]
        accepted = ALGORITHM_OPTIONS.get(algorithm, {})
        options = {k: _first(v) for k, v in chosen.items() if k in accepted and v is not None}
        request = LoraTrainingRequest(
            config=config, algorithm=algorithm, rank=_first(rank), algorithm_options=options,
            alpha=1.0 if alpha is None else _first(alpha),
            training_dtype=_first(training_dtype), lora_dtype=_first(lora_dtype),
            gradient_checkpointing=_first(gradient_checkpointing),
            checkpoint_depth=1 if checkpoint_depth is None else _first(checkpoint_depth),
            offloading=bool(_first(offloading)),
            target_layers=DEFAULT_PRESET if target_layers is None else _first(target_layers),
            include_pattern=_first(include_pattern) or "", exclude_pattern=_first(exclude_pattern) or "",
            train_norm_bias=bool(_first(train_norm_bias)), bypass_mode=True if bypass_mode is None else _first(bypass_mode),
            existing=existing, captions=list(captions) if captions else None,
            samples=_sample_settings(sample_every, sample_positive, sample_vae, sample_seed, sample_width,
                                     sample_height, sample_steps),
            checkpoints=CheckpointSettings(
                output_dir=folder_paths.get_output_directory(),
                prefix=_first(checkpoint_prefix) or "loras/loralab_checkpoint",
                every=_first(save_every) or 0, keep_last=_first(keep_last) or 3))
        progress = comfy.utils.ProgressBar(config.steps)

        def on_step(report):
            progress.update_absolute(report.step, report.total)

        events = LiveTrainingEvents.for_running_node(getattr(cls.hidden, "unique_id", None),
                                                     folder_paths.get_output_directory(),
                                                     getattr(cls.hidden, "extra_pnginfo", None))
        result = train_lora(_first(model), latents, positive, request, on_step=on_step, events=events)
        shown = [_saved_output(p) for p in result.samples]  # the previews stay on the node after the run
        return io.NodeOutput(result.model, result.lora, {"loss": result.losses}, result.total_steps,
                             ui={"images": shown} if shown else None)


def _saved_output(path) -> ui.SavedResult:
    """A file under the output directory as the UI addresses it (file name, sub-folder, type)."""
    sub = os.path.relpath(os.path.dirname(path), folder_paths.get_output_directory())
    return ui.SavedResult(os.path.basename(path), "" if sub == "." else sub.replace(os.sep, "/"), io.FolderType.output)


def _sample_settings(every, positive, vae, seed, width, height, steps) -> SampleSettings | None:
    """Preview settings from the sample_* inputs, or None when previews are off."""
    every = _first(every) or 0
    if every <= 0:
        return None
    positive, vae = _first(positive), _first(vae)
    if positive is None or vae is None:
        missing = " and ".join(n for n, v in (("sample_positive", positive), ("sample_vae", vae)) if v is None)
        raise ValueError(f"sample_every is {every} but {missing} is not connected: connect a CLIP Text Encode "
                         f"and a VAE, or set sample_every to 0")
    return SampleSettings(every=every, positive=positive, vae=vae, seed=_first(seed) or 0,
                          width=_first(width) or 512, height=_first(height) or 512, steps=_first(steps) or 20)


class SaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoraLab_SaveLoRA",
            display_name="Save LoRA (LoRA Lab)",
            category=CATEGORY,
            description="Saves a LoRA as .safetensors with its training metadata, under the output directory.",
            is_output_node=True,
            inputs=[
                io.LoraModel.Input("lora", tooltip="The LoRA to save (from Train LoRA)."),
                io.String.Input("prefix", default="loras/ComfyUI_trained_lora",
                                tooltip="File name prefix, relative to the output directory."),
                io.Int.Input("steps", optional=True, min=0, max=100000000, force_input=True,
                             tooltip="Steps trained, used in the file name."),
                io.Combo.Input("key_style", options=list(KEY_STYLES), default=DEFAULT_KEY_STYLE, optional=True,
                               tooltip="kohya: lora_unet_* names that A1111, Forge, civitai and diffusers read. "
                                       "comfyui: diffusion_model.* names of ComfyUI's native trainer."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, lora, prefix, steps=None, key_style=DEFAULT_KEY_STYLE):
        if not isinstance(lora, dict) or not lora:
            raise ValueError("lora is empty: connect the lora output of a Train LoRA node")
        output_dir = folder_paths.get_output_directory()
        path = save_lora(next_lora_path(output_dir, prefix, steps), lora, key_style, steps)
        rel = os.path.relpath(path, output_dir)
        log.info("LoRA Lab: saved %s", path)
        return io.NodeOutput(ui={"lora_files": [{"filename": os.path.basename(rel),
                                                 "subfolder": os.path.dirname(rel), "type": "output"}]})


class LoadLoraModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoraLab_LoadLoraModel",
            display_name="Apply LoRA (LoRA Lab)",
            category=CATEGORY,
            description="Applies a trained LoRA (LORA_MODEL) to a model.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the LoRA will be applied to."),
                io.LoraModel.Input("lora", tooltip="The LoRA to apply."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly to apply the LoRA; may be negative."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the LoRA applied.")],
        )

    @classmethod
    def execute(cls, model, lora, strength_model):
        return io.NodeOutput(with_lora_patches(model, lora, strength_model))


class LossGraph(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoraLab_LossGraph",
            display_name="Plot Loss Graph (LoRA Lab)",
            category=CATEGORY,
            description="Plots the loss of a training run (raw and smoothed) and saves it as a PNG.",
            is_output_node=True,
            inputs=[
                io.LossMap.Input("loss", tooltip="The loss_map output of Train LoRA."),
                io.String.Input("filename_prefix", default="loss_graph", tooltip="File name prefix, relative to the output directory."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, loss, filename_prefix):
        values = [float(v) for v in (loss or {}).get("loss", [])]
        if not values:
            raise ValueError("loss has no values: connect the loss_map output of a Train LoRA node")
        output_dir = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, output_dir)
        filename = f"{name}_{counter:05}_.png"
        check_name_fits(Path(folder), filename, "filename_prefix")
        render_loss_plot(values, os.path.join(folder, filename))
        image = ui.SavedResult(filename, subfolder, io.FolderType.output)
        # "images" shows the PNG as the node's preview; "loss" lets API clients read the values. A
        # non-finite loss goes out as null: NaN is not JSON, and the frontend would drop the whole
        # message (and fail to read /history while the prompt is in it).
        return io.NodeOutput(ui={"images": [image], "loss": [finite_or_none(v) for v in values]})


NODES = [LoadImageSet, ImageSetFromImages, TrainLora, SaveLoRA, LoadLoraModel, LossGraph]
