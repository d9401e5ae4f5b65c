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


def example_lora() -> Path:
    """A LoRA trained for a few steps on the tiny checkpoint (+ its .trainstate), for the
    continue-training template; built in a subprocess on first use and cached."""
    import subprocess
    import sys

    from .example_lora import EXAMPLE_LORA_FILENAME, expected_stamp, read_example_stamp
    checkpoint, dataset = tiny_checkpoint(), motif_dataset()
    path = fixtures_dir() / EXAMPLE_LORA_FILENAME
    if not path.is_file() or read_example_stamp(path) != expected_stamp(checkpoint):
        subprocess.run([sys.executable, "-m", "devkit.example_lora", "--out", str(path.parent),
                        "--checkpoint", str(checkpoint), "--dataset", str(dataset)],
                       cwd=Path(__file__).resolve().parent.parent, check=True, stdout=subprocess.DEVNULL)
    return path


def install_example_lora(base_dir: Path) -> str:
    """Links the example LoRA and its .trainstate into ``base_dir``/models/loras (a ComfyUI base
    directory) and returns the name ComfyUI lists it under."""
    lora = example_lora()
    loras = base_dir / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    for source in (lora, lora.with_suffix(".trainstate")):
        dest = loras / source.name
        if not dest.exists():
            dest.symlink_to(source.resolve())
    return lora.name
