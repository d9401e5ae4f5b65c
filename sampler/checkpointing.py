"""Gradient checkpointing for ComfyUI diffusion models, attached as a patcher injection.

ComfyUI's UNet calls the children of its TimestepEmbedSequential blocks directly, so the units
to checkpoint are those children (ResBlock, SpatialTransformer, ...): the highest modules that
are not plain containers. Their activations are dropped after the forward and recomputed in the
backward.

Two kinds of piece are left unchecked because checkpointing them costs a recompute and saves
nothing:
- a single layer (a module with no submodules: conv_in, a time-embedding Linear, the output
  conv): what the checkpoint keeps, its input, is what the layer keeps for its own backward;
- the last piece the forward runs: its backward comes first, so its recompute would start the
  moment the forward ends, and its activations would be alive at that moment either way. Peak
  memory is the same, one piece's recompute less. Which piece runs last is learnt from the first
  forward (RunOrder).
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
    Each further depth replaces every unit by its own units one level down (depth 2: a transformer's
    blocks; depth 3: attention and feed-forward ...), so deeper means finer pieces: less recomputed
    per piece, more boundary activations kept. Single layers are never units (see the module
    docstring); a module whose finer pieces would all be single layers stays whole.
    """
    units = []
    for name, child in root.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, CONTAINERS) or full in skip:
            units += checkpoint_units(child, skip, f"{full}.", depth)
        elif not any(True for _ in child.parameters()) or not any(True for _ in child.children()):
            continue
        elif depth > 1:
            inner = checkpoint_units(child, skip, f"{full}.", depth - 1)
            units += inner if inner else [full]
        else:
            units.append(full)
    return units


class RunOrder:
    """Learns, from the first forward, which unit runs last, so that it can run unchecked.

    Units are recorded as they run; the first unit to run a second time marks the start of the next
    forward, and the last one recorded before it is the last piece of a forward from then on.
    Recomputes do not pass through here (they call the unit's own forward), so they do not count.
    """

    def __init__(self):
        self.seen: list[str] = []
        self.last: str | None = None

    def note(self, name: str) -> None:
        if self.last is None:
            if name in self.seen:
                self.last = self.seen[-1]
            else:
                self.seen.append(name)


def _checkpointed(name: str, forward, order: RunOrder):
    def run(*args, **kwargs):
        order.note(name)
        if not torch.is_grad_enabled() or name == order.last:
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def attach_checkpointing(model_patcher, skip: set[str] = frozenset(), depth: int = 1) -> int:
    """Checkpoints the units of the diffusion model while the patcher is loaded (from the second
    forward on, all but the one that runs last); returns the count of units.

    ``skip`` names modules (adapter targets) that must keep their own forward.
    """
    if not 1 <= depth <= 5:
        raise ValueError(f"checkpoint_depth must be 1 to 5, got {depth}")
    names = checkpoint_units(model_patcher.model.diffusion_model, set(skip), depth=depth)
    order = RunOrder()

    def inject(mp):
        dm = mp.model.diffusion_model
        for name in names:
            module = dm.get_submodule(name)
            module.forward = _checkpointed(name, module.forward, order)

    def eject(mp):
        dm = mp.model.diffusion_model
        for name in names:
            dm.get_submodule(name).__dict__.pop("forward", None)

    model_patcher.set_injections(CHECKPOINT_KEY, [PatcherInjection(inject=inject, eject=eject)])
    return len(names)
