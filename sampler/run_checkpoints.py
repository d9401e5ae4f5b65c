"""Resumable checkpoints during a run, and the one routine that writes a LORA_MODEL to disk.

A checkpoint is an ordinary adapter file plus its ``.trainstate`` sidecar (optimizer moments, RNG,
data order, step), so choosing it as existing_lora continues the run exactly. Periodic checkpoints
are ``<prefix>_step<NNNNN>.safetensors``; the one saved when the run is interrupted is
``<prefix>_step<NNNNN>_interrupted.safetensors`` and is never pruned. Pruning deletes only
periodic files this run wrote itself, never anything else in the folder.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..adapters.files import check_name_fits, next_lora_path, save_adapter_file
from ..adapters.keys import to_key_style
from ..adapters.metadata import metadata_of
from . import train_state
from .run_outputs import CheckpointSettings

log = logging.getLogger("loralab")

INTERRUPTED_TAG = "_interrupted"
OUTPUT_LORAS = "loras"  # sub-folder of the output directory that existing_lora also lists


def save_lora(path: str | os.PathLike, lora, key_style: str, steps: int | None = None) -> Path:
    """Writes a LORA_MODEL value to ``path`` in ``key_style`` with its metadata, atomically.

    A resumable training state the value carries goes to the ``.trainstate`` sidecar, written
    first so an adapter file never points at a missing state; a sidecar left by an older file of
    the same name is removed, so it can never be mistaken for this file's state.
    """
    tensors = to_key_style(dict(lora), key_style, getattr(lora, "kohya_names", None))
    metadata = metadata_of(lora)
    metadata["loralab_key_style"] = key_style
    if steps is not None:
        metadata["ss_steps"] = str(steps)
    state = getattr(lora, "train_state", None)
    state_path = train_state.state_path_for(path)
    if state is not None:
        train_state.save(state_path, *state)
    else:
        state_path.unlink(missing_ok=True)
    try:
        return save_adapter_file(path, tensors, metadata)
    except BaseException:
        state_path.unlink(missing_ok=True)  # no sidecar without its adapter file
        raise


def checkpoint_location(output_dir: str | os.PathLike, prefix: str) -> tuple[Path, str]:
    """(folder, file stem) of ``prefix`` under ``output_dir``, checked exactly as SaveLoRA's prefix
    is: a prefix that is empty, absolute or leaves the output directory raises ValueError."""
    try:
        probe = next_lora_path(output_dir, prefix, None)
    except ValueError as e:
        raise ValueError(f"checkpoint_prefix: {e}") from None
    stem = probe.name[: -len("_00001_.safetensors")]  # next_lora_path appends _<counter>_.safetensors
    # the longest name a run writes, checked now rather than at the first checkpoint after training
    check_name_fits(probe.parent, checkpoint_filename(stem, 99999, interrupted=True), "checkpoint_prefix")
    return probe.parent, stem


def checkpoint_filename(stem: str, step: int, interrupted: bool = False) -> str:
    return f"{stem}_step{step:05d}{INTERRUPTED_TAG if interrupted else ''}.safetensors"


def output_loras_folder() -> str:
    """``<output directory>/loras``, where SaveLoRA's default prefix and checkpoints go."""
    import folder_paths
    return os.path.join(folder_paths.get_output_directory(), OUTPUT_LORAS)


def register_output_loras() -> str:
    """Lists ``<output>/loras`` as one more ComfyUI "loras" folder, so saved LoRAs and checkpoints
    can be chosen as existing_lora (and in LoraLoader) after a refresh, without moving files."""
    import folder_paths
    folder = output_loras_folder()
    if folder not in folder_paths.get_folder_paths("loras"):
        folder_paths.add_model_folder_path("loras", folder)
    return folder


def listed_name(path: str | os.PathLike) -> str | None:
    """The name ComfyUI's LoRA lists show ``path`` under, or None when no "loras" folder holds it."""
    import folder_paths
    path = Path(path).resolve()
    for folder in folder_paths.get_folder_paths("loras"):
        root = Path(folder).resolve()
        if root in path.parents:
            return path.relative_to(root).as_posix()
    return None


def resume_hint(path: Path, remaining: int) -> str:
    """How to continue from a checkpoint, in the words of the node's inputs."""
    name = listed_name(path)
    steps = f"set steps to {remaining} (the steps still to do)" if remaining > 0 else "set steps to how many more you want"
    if name is None:
        return (f"To continue: move it and its .trainstate file to models/loras (or use a checkpoint_prefix "
                f"starting with 'loras/'), refresh, choose it as existing_lora and {steps}.")
    return f"To continue: refresh (press R), choose '{name}' as existing_lora and {steps}."


class RunCheckpoints:
    """Saves the checkpoints of one run under ``settings.prefix`` and prunes its periodic ones."""

    def __init__(self, settings: CheckpointSettings):
        if settings.every < 0:
            raise ValueError(f"save_every must be 0 (off) or more, got {settings.every}")
        if settings.keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {settings.keep_last}")
        self.settings = settings
        self.folder, self.stem = checkpoint_location(settings.output_dir, settings.prefix)
        self.periodic: list[Path] = []  # written by this run, oldest first

    def due(self, step: int) -> bool:
        """Whether global step ``step`` gets a periodic checkpoint."""
        return self.settings.every > 0 and step > 0 and step % self.settings.every == 0

    def _write(self, step: int, lora, interrupted: bool) -> Path:
        path = self.folder / checkpoint_filename(self.stem, step, interrupted)
        if path.exists() and path not in self.periodic:
            log.warning("LoRA Lab: replacing %s from an earlier run with the same checkpoint_prefix; give each "
                        "run its own checkpoint_prefix to keep both", path)
        return save_lora(path, lora, self.settings.key_style, steps=step)

    def save_periodic(self, step: int, lora) -> tuple[Path, str]:
        """Saves the checkpoint of ``step`` and deletes this run's periodic checkpoints beyond the
        newest ``keep_last`` (adapter and .trainstate); returns (path, message)."""
        path = self._write(step, lora, interrupted=False)
        if path in self.periodic:
            self.periodic.remove(path)
        self.periodic.append(path)
        while len(self.periodic) > self.settings.keep_last:
            old = self.periodic.pop(0)
            old.unlink(missing_ok=True)
            train_state.state_path_for(old).unlink(missing_ok=True)
            log.info("LoRA Lab: removed old checkpoint %s (keep_last %d)", old, self.settings.keep_last)
        message = f"LoRA Lab: checkpoint at step {step}: {path}"
        log.info(message)
        return path, message

    def save_interrupted(self, step: int, lora, remaining: int) -> tuple[Path, str]:
        """Saves the checkpoint of the last completed ``step`` of an interrupted run; returns
        (path, message), the message saying where it is and how to continue."""
        path = self._write(step, lora, interrupted=True)
        message = (f"LoRA Lab: training was interrupted; the last completed step ({step}) is saved as a resumable "
                   f"checkpoint: {path}. {resume_hint(path, remaining)}")
        log.warning(message)
        return path, message
