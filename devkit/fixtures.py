"""The generated test/demo fixtures, cached under $LORALAB_HOME/fixtures (outside git)."""
from __future__ import annotations

from pathlib import Path

from .comfy_path import loralab_home

DATASET_NAME = "loralab_motif"
DATASET_SIZE = 128
DATASET_COUNT = 8


def fixtures_dir() -> Path:
    path = loralab_home() / "fixtures"
    path.mkdir(parents=True, exist_ok=True)
    return path


def tiny_checkpoint() -> Path:
    """The tiny SD1.5-architecture checkpoint, built on first use (ComfyUI must be importable)."""
    from .comfy_path import add_comfyui_to_sys_path
    add_comfyui_to_sys_path()
    from .tiny_model import ensure_tiny_sd15_checkpoint
    return ensure_tiny_sd15_checkpoint(fixtures_dir())


def motif_dataset(size: int = DATASET_SIZE, count: int = DATASET_COUNT, mixed_sizes: bool = False) -> Path:
    """The captioned motif image folder (deterministic; regenerated only when missing)."""
    from .motif_dataset import make_motif_dataset
    folder = fixtures_dir() / f"{DATASET_NAME}_{size}_{count}{'_mixed' if mixed_sizes else ''}"
    marker = folder / ".complete"
    if not marker.exists():
        folder.mkdir(parents=True, exist_ok=True)
        make_motif_dataset(folder, count=count, size=size, seed=0, mixed_sizes=mixed_sizes)
        marker.write_text("ok\n")
    return folder
