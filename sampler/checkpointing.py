"""Gradient checkpointing for ComfyUI diffusion models, attached as a patcher injection.

ComfyUI's UNet calls the children of its TimestepEmbedSequential blocks directly, so the units
to checkpoint are those children (ResBlock, SpatialTransformer, ...): the highest modules that
are not plain containers. Their activations are dropped after the forward and recomputed in the
backward.
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint

from comfy.patcher_extension import PatcherInjection

CHECKPOINT_KEY = "loralab_checkpointing"
CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)


def checkpoint_units(root: torch.nn.Module, skip: set[str] = frozenset(), prefix: str = "", depth: int = 1) -> list[str]:
    """Names of the modules to checkpoint below ``root``.

    Depth 1: the highest non-container modules with parameters (ResBlock, SpatialTransformer ...).
    Each further depth replaces every unit by its own units one level down (depth 2: a ResBlock's
    in/out layers, a transformer's blocks; depth 3: attention and feed-forward ...), so deeper means
    finer pieces: less recomputed per piece, more boundary activations kept.
    """
    units = []
    for name, child in root.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, CONTAINERS) or full in skip:
            units += checkpoint_units(child, skip, f"{full}.", depth)
        elif not any(True for _ in child.parameters()):
            continue
        elif depth > 1:
            inner = checkpoint_units(child, skip, f"{full}.", depth - 1)
            units += inner if inner else [full]
        else:
            units.append(full)
    return units


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def attach_checkpointing(model_patcher, skip: set[str] = frozenset(), depth: int = 1) -> int:
    """Checkpoints every unit of the diffusion model while the patcher is loaded; returns the count.

    ``skip`` names modules (adapter targets) that must keep their own forward.
    """
    if not 1 <= depth <= 5:
        raise ValueError(f"checkpoint_depth must be 1 to 5, got {depth}")
    names = checkpoint_units(model_patcher.model.diffusion_model, set(skip), depth=depth)

    def inject(mp):
        dm = mp.model.diffusion_model
        for name in names:
            module = dm.get_submodule(name)
            module.forward = _checkpointed(module.forward)

    def eject(mp):
        dm = mp.model.diffusion_model
        for name in names:
            dm.get_submodule(name).__dict__.pop("forward", None)

    model_patcher.set_injections(CHECKPOINT_KEY, [PatcherInjection(inject=inject, eject=eject)])
    return len(names)
