"""Preview images at the current training state, made with ComfyUI's own sampler.

A preview samples the training patcher itself (adapters live) with euler / "normal" at a fixed
seed, decodes it with the given VAE and saves ``<prefix>_<RRRRR>_step<NNNNN>.png`` under the output
directory. ``RRRRR`` is the run's number, taken once at run start from ComfyUI's SaveImage counter,
so every run (and every Train LoRA node of a graph) keeps its own previews and never overwrites
another's. It must leave training exactly as it was: no autograd, the training RNG untouched (the
noise comes from the sample seed, and the global RNG is restored afterwards), modules' train/eval
flags restored, and the patcher neither reloaded nor re-patched, so a run with previews trains
bit-identical weights to one without.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import comfy.model_management
import comfy.patcher_extension
import comfy.sample

from ..adapters.files import atomic_file
from .run_outputs import SampleSettings

SAMPLER = "euler"
SCHEDULER = "normal"
# cfg 1: the prompt alone, one model evaluation per sampler step (half the cost of guidance), which
# shows what the adapter learned without a negative prompt's influence.
CFG = 1.0
PREVIEW_MAX_SIZE = 512  # longest side of the copy shown on the node while training
SKIP_LOAD_KEY = "loralab_preview_keep_loaded"
MAX_NAME_CLASHES = 5  # fresh run numbers tried before a preview gives up (only racing writers clash)

log = logging.getLogger("loralab")


def check_sample_settings(settings: SampleSettings) -> None:
    """Raises ValueError naming the sample_* input that cannot work, before any training starts."""
    if settings.every < 1:
        raise ValueError(f"sample_every must be 1 or more to make previews, got {settings.every}")
    for name, value in (("sample_width", settings.width), ("sample_height", settings.height)):
        if value < 64 or value % 8:
            raise ValueError(f"{name} is {value}: the preview size must be at least 64 and a multiple of 8 "
                             f"(the VAE works on 8x8 pixel blocks); try {max(64, round(value / 8) * 8)}")
    if settings.steps < 1:
        raise ValueError(f"sample_steps must be 1 or more, got {settings.steps}")


def zeroed(conditioning: list) -> list:
    """The conditioning with every tensor zeroed: the sampler's negative (unused at cfg 1)."""
    out = []
    for cross_attn, extras in conditioning:
        extras = dict(extras)
        for key in ("pooled_output", "conditioning_lyrics"):
            if isinstance(extras.get(key), torch.Tensor):
                extras[key] = torch.zeros_like(extras[key])
        out.append([torch.zeros_like(cross_attn), extras])
    return out


def _keep_loaded(executor, model, noise_shape, conds, model_options=None):
    """PREPARE_SAMPLING wrapper: a training patcher is loaded already, exactly as training needs it
    (offloaded or not), and ComfyUI's loader would load more of it onto the device; a patcher that
    is not loaded is loaded the usual way."""
    if any(loaded.model is model for loaded in comfy.model_management.current_loaded_models):
        return model.model, conds, []
    return executor(model, noise_shape, conds, model_options=model_options)


@contextlib.contextmanager
def _training_untouched(patcher):
    """Keeps what training depends on as it was: autograd off, the global RNG (CPU and the
    device's) forked, every module's train/eval flag restored."""
    device = patcher.load_device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    modules = list(patcher.model.modules())
    modes = [m.training for m in modules]
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, SKIP_LOAD_KEY, _keep_loaded)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            yield
    finally:
        patcher.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, SKIP_LOAD_KEY)
        for module, mode in zip(modules, modes):
            module.training = mode


def render(patcher, settings: SampleSettings) -> torch.Tensor:
    """One preview image, [1, H, W, 3] floats in 0..1, from ``patcher`` as it is now."""
    with _training_untouched(patcher):
        latent = torch.zeros([1, 4, settings.height // 8, settings.width // 8])
        latent = comfy.sample.fix_empty_latent_channels(patcher, latent)
        noise = comfy.sample.prepare_noise(latent, settings.seed)
        samples = comfy.sample.sample(patcher, noise, settings.steps, CFG, SAMPLER, SCHEDULER,
                                      settings.positive, zeroed(settings.positive), latent, denoise=1.0,
                                      disable_pbar=True, seed=settings.seed)
        images = settings.vae.decode(samples)
    images = images.reshape(-1, *images.shape[-3:])[:1]
    return images.float().clamp(0, 1).cpu()


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(np.clip(255.0 * image[0].numpy(), 0, 255).astype(np.uint8))


def run_folder(output_dir: str, prefix: str, width: int, height: int) -> tuple[Path, str, int]:
    """(folder, file name, run number) for a new run's previews, by ComfyUI's own image-save rules
    (``%width%``-style variables, sub-folders, never outside the output directory) and its
    SaveImage counter: one past the highest ``<name>_<number>_...`` file there, so a new run never
    takes the number of one whose previews are on disk."""
    import folder_paths
    folder, filename, counter, _, _ = folder_paths.get_save_image_path(prefix, output_dir, width, height)
    return Path(folder), filename, counter


def preview_name(filename: str, run: int, step: int) -> str:
    """``<filename>_<RRRRR>_step<NNNNN>.png``: the run number first, where ComfyUI's counter reads it."""
    return f"{filename}_{run:05d}_step{step:05d}.png"


def save_png(image: torch.Tensor, path: Path, text: dict[str, str]) -> Path:
    """Writes the PNG atomically (temp file in the same folder, then moved into place), with
    ``text`` as PNG text chunks unless ComfyUI runs with --disable-metadata. Raises
    FileExistsError, leaving the file there untouched, if ``path`` exists already."""
    from comfy.cli_args import args
    info = None
    if not args.disable_metadata:
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    with atomic_file(path, overwrite=False) as tmp:
        to_pil(image).save(tmp, format="PNG", pnginfo=info, compress_level=4)
    return path


def show_on_node(image: torch.Tensor, value: int, total: int) -> None:
    """Shows the preview on the running node through ComfyUI's progress bar, as KSampler's live
    previews are shown (a no-op outside a server)."""
    import comfy.utils
    comfy.utils.ProgressBar(total).update_absolute(value, total, ("JPEG", to_pil(image), PREVIEW_MAX_SIZE))


class RunPreviews:
    """The previews of one run: when they are due, and making + saving one. The run number is taken
    once, here, so all previews of the run share it."""

    def __init__(self, settings: SampleSettings, output_dir: str):
        check_sample_settings(settings)
        self.settings = settings
        self.output_dir = output_dir
        self.folder, self.filename, self.run = self._new_run()  # a bad prefix fails now
        self.saved: list[Path] = []

    def _new_run(self) -> tuple[Path, str, int]:
        s = self.settings
        return run_folder(self.output_dir, s.prefix, s.width, s.height)

    def path(self, step: int) -> Path:
        """Where this run's preview of global step ``step`` goes."""
        return self.folder / preview_name(self.filename, self.run, step)

    def due(self, step: int) -> bool:
        return step > 0 and step % self.settings.every == 0

    def make(self, patcher, step: int) -> tuple[Path, torch.Tensor]:
        """Renders and saves the preview of global step ``step``; returns (path, image)."""
        s = self.settings
        image = render(patcher, s)
        text = {"loralab_preview": f"step {step}, seed {s.seed}, {s.width}x{s.height}, "
                                   f"{SAMPLER}/{SCHEDULER} {s.steps} steps, cfg {CFG}"}
        path = self._save(image, step, text)
        self.saved.append(path)
        return path, image

    def _save(self, image: torch.Tensor, step: int, text: dict[str, str]) -> Path:
        """Saves under this run's number; if another writer (a second ComfyUI on the same output
        folder) took that name meanwhile, the run moves to a fresh number rather than overwrite."""
        for _ in range(MAX_NAME_CLASHES):
            try:
                return save_png(image, self.path(step), text)
            except FileExistsError:
                taken = self.path(step)
                self.folder, self.filename, self.run = self._new_run()
                log.warning("LoRA Lab: preview %s exists already (another run writes to the same folder); "
                            "this run's previews continue as %s", taken, self.path(step).name)
        raise FileExistsError(f"could not find a free preview name for step {step} in {self.folder}: "
                              f"other runs keep taking the names; set a different output directory")
