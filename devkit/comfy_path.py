"""Make a ComfyUI checkout importable (``import comfy``, ``import nodes``) from dev tools and tests.

The pack runs inside a user's ComfyUI, so the dev tools never vendor it: they find one through
``COMFYUI_PATH`` or the copy that ``scripts/setup_host.sh`` puts in ``$LORALAB_HOME/ComfyUI``.
"""
from __future__ import annotations

import os
import pathlib
import sys

DEFAULT_LORALAB_HOME = pathlib.Path.home() / ".cache" / "lora-lab"


def loralab_home() -> pathlib.Path:
    """Where the dev venv, the ComfyUI copy and cached fixtures live."""
    return pathlib.Path(os.environ.get("LORALAB_HOME") or DEFAULT_LORALAB_HOME).expanduser()


def comfyui_path() -> pathlib.Path:
    """The ComfyUI checkout to use: ``$COMFYUI_PATH``, else ``$LORALAB_HOME/ComfyUI``."""
    explicit = os.environ.get("COMFYUI_PATH")
    return pathlib.Path(explicit).expanduser() if explicit else loralab_home() / "ComfyUI"


def _accelerator_available() -> bool:
    """Whether ComfyUI would find a non-CPU torch device (CUDA/ROCm, Apple MPS, Intel XPU)."""
    import torch

    if torch.cuda.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def add_comfyui_to_sys_path(force_cpu: bool | None = None) -> pathlib.Path:
    """Put ComfyUI first on ``sys.path`` and return its folder.

    ComfyUI's ``comfy.cli_args`` parses an empty argument list unless
    ``comfy.options.enable_args_parsing()`` was called, so the caller's own ``sys.argv`` (pytest's,
    a CLI's) never leaks into ComfyUI. Without ``--cpu`` ComfyUI asks CUDA for a device at import
    time and crashes on a machine without one, so ``force_cpu`` sets that flag: by default from env
    ``LORALAB_FORCE_CPU`` ("1"/"0") or else whenever torch sees no accelerator. It only takes
    effect before ``comfy.model_management`` is imported.
    """
    root = comfyui_path().resolve()
    if not (root / "comfy" / "sd.py").is_file():
        raise FileNotFoundError(
            f"no ComfyUI at {root}: set COMFYUI_PATH to a ComfyUI checkout or run scripts/setup_host.sh"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if force_cpu is None:
        env = os.environ.get("LORALAB_FORCE_CPU", "")
        force_cpu = env not in ("", "0") if env else not _accelerator_available()
    if force_cpu:
        import comfy.cli_args

        if "comfy.model_management" in sys.modules and not comfy.cli_args.args.cpu:
            raise RuntimeError("force_cpu requested after comfy.model_management was imported")
        comfy.cli_args.args.cpu = True
    return root
