"""Gradient checkpointing for ComfyUI diffusion models, attached as a patcher injection.

ComfyUI's UNet calls the children of its TimestepEmbedSequential blocks directly, so the units
to checkpoint are those children (ResBlock, SpatialTransformer, ...): the highest modules that
are not plain containers. Their activations are dropped after the forward and recomputed in the
backward.

Pieces are left unchecked where checkpointing them would cost a recompute and save little or
nothing:
- a single layer (a module with no submodules: conv_in, a time-embedding Linear, the output
  conv): what the checkpoint keeps, its input, is what the layer keeps for its own backward;
- the last piece the forward runs: its backward comes first, so its recompute would start the
  moment the forward ends, and its activations would be alive at that moment either way. Peak
  memory is the same, one piece's recompute less. Which piece runs last is learnt from the first
  forward (RunOrder);
- a piece that frees far less memory per FLOP of recompute than the best piece (a UNet's
  ResBlocks, next to its transformer blocks): measured by one forward before training, see
  checkpoint_plan.

A piece that adds to its own input in place (Flux's blocks: ``img += ...``) would change the
input the checkpoint keeps for its recompute; such a piece runs on a copy of what it modifies (see
inplace_guard.InputCopies: learnt from the measuring forward, nothing copied where nothing is
modified).
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint

from comfy.patcher_extension import PatcherInjection

from .checkpoint_plan import PieceMeter, choose_pieces, describe, exchange_rate
from .inplace_guard import InputCopies, observing
from .recompute_reuse import with_kept_results

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


class CheckpointPlan:
    """The units of one patcher and which of them are checkpointed: all of them until ``measure``
    has chosen, never the one that runs last."""

    def __init__(self, names: list[str]):
        self.names = names
        self.order = RunOrder()
        self.meter = PieceMeter()
        self.chosen: set[str] | None = None  # None: not measured, every unit is checkpointed
        self.costs: dict = {}
        self.keep_below: float | None = None  # bytes per FLOP under which a piece keeps a result
        self.copies = InputCopies()  # which inputs each piece modifies in place

    def __len__(self) -> int:
        return len(self.names)

    def checkpoints(self, name: str) -> bool:
        return name != self.order.last and (self.chosen is None or name in self.chosen)

    def measure(self, forward) -> str:
        """Runs ``forward()`` (a training forward with grad enabled, never back-propagated), measures
        every unit and keeps the ones worth checkpointing; returns a line for the log. The units
        also show which of their inputs they modify in place (see InputCopies)."""
        with observing():
            self.costs = self.meter.measure(forward)
        self.chosen = choose_pieces(self.costs)
        self.keep_below = exchange_rate(self.costs) or None
        return describe(self.costs, self.chosen)


def _checkpointed(name: str, forward, plan: CheckpointPlan):
    def run(*args, **kwargs):
        plan.order.note(name)
        if plan.meter.active:
            return plan.meter.run(name, lambda *a, **k: plan.copies.observe(name, forward, a, k), args, kwargs)
        if not torch.is_grad_enabled() or not plan.checkpoints(name):
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(with_kept_results(plan.copies.wrap(name, forward), plan.keep_below),
                                                 *args, use_reentrant=False, **kwargs)
    return run


def attach_checkpointing(model_patcher, skip: set[str] = frozenset(), depth: int = 1) -> CheckpointPlan:
    """Checkpoints the units of the diffusion model while the patcher is loaded (from the second
    forward on, all but the one that runs last; after ``plan.measure``, the ones it chose) and
    returns the plan.

    ``skip`` names modules (adapter targets) that must keep their own forward.
    """
    if not 1 <= depth <= 5:
        raise ValueError(f"checkpoint_depth must be 1 to 5, got {depth}")
    plan = CheckpointPlan(checkpoint_units(model_patcher.model.diffusion_model, set(skip), depth=depth))
    names = plan.names

    def inject(mp):
        dm = mp.model.diffusion_model
        for name in names:
            module = dm.get_submodule(name)
            module.forward = _checkpointed(name, module.forward, plan)

    def eject(mp):
        dm = mp.model.diffusion_model
        for name in names:
            dm.get_submodule(name).__dict__.pop("forward", None)

    model_patcher.set_injections(CHECKPOINT_KEY, [PatcherInjection(inject=inject, eject=eject)])
    return plan
