"""Which pieces gradient checkpointing recomputes: those that free the most memory per FLOP.

Checkpointing a piece frees the activations it keeps for its backward, and costs a recompute of
its forward up to the last of those activations (the recompute stops there). Pieces differ a
lot in that exchange rate. In an SD1.5 UNet (measured on the tiny fixture at 256 px) a
transformer block keeps 20-38 MiB for a recompute of 4.7-5.9 GFLOP, while a ResBlock keeps
2-6 MiB for 3-8 GFLOP: about eight times less memory per FLOP, ~10% of the activation memory for
half the recompute.

So before the first step, one forward measures every piece: the bytes of the tensors it saves
for the backward (which that forward then drops at once, so it needs no more memory than an
inference forward) and the FLOPs it runs up to the last of them. Pieces whose bytes per FLOP
are below DENSITY_SHARE of the densest piece's run unchecked. In a model of like blocks (a DiT)
all pieces are alike and all are checkpointed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from .flop_formulas import flop_counter_mode
from .winograd import direct_convs

log = logging.getLogger("loralab")

# A piece is checkpointed when it frees at least this share of the densest piece's bytes per FLOP:
# below it, a byte freed costs over three times the recompute it costs in the best piece.
DENSITY_SHARE = 1 / 3


@dataclass
class PieceCost:
    saved_bytes: int = 0  # activations kept for the backward, its inputs and parameters left out
    recompute_flops: int = 0  # FLOPs of its forward up to the last tensor it saves

    @property
    def density(self) -> float:
        return self.saved_bytes / max(self.recompute_flops, 1)


@dataclass
class _Recorder:
    """Attributes each tensor saved for backward to the piece running at that moment."""
    counter: object
    costs: dict[str, PieceCost] = field(default_factory=dict)
    running: list = field(default_factory=list)  # [(name, flops at start, storages to leave out)]
    # Storages counted so far, by address. The saved tensors are dropped at once, so an address
    # can come back for a new tensor: it counts again once the storage seen there has died.
    seen: dict = field(default_factory=dict)

    def _first_time(self, storage) -> bool:
        key = storage.data_ptr()
        known = self.seen.get(key)
        if known is not None and not known.expired():
            return False
        self.seen[key] = StorageWeakRef(storage)
        return True

    def enter(self, name: str, args, kwargs) -> None:
        skip = {t.untyped_storage().data_ptr() for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)}
        self.running.append((name, self.counter.get_total_flops(), skip))
        self.costs.setdefault(name, PieceCost())

    def leave(self) -> None:
        self.running.pop()

    def pack(self, tensor: torch.Tensor):
        if self.running and not isinstance(tensor, torch.nn.Parameter):
            name, start, skip = self.running[-1]
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in skip and self._first_time(storage):
                cost = self.costs[name]
                cost.saved_bytes += storage.nbytes()
                cost.recompute_flops = int(self.counter.get_total_flops() - start)
        return None  # dropped at once: this forward is never back-propagated


class PieceMeter:
    """Measures pieces while ``active`` (the pieces' wrappers call ``run``)."""

    def __init__(self):
        self.recorder: _Recorder | None = None

    @property
    def active(self) -> bool:
        return self.recorder is not None

    def run(self, name: str, forward, args, kwargs):
        self.recorder.enter(name, args, kwargs)
        try:
            return forward(*args, **kwargs)
        finally:
            self.recorder.leave()

    def measure(self, forward) -> dict[str, PieceCost]:
        """Runs ``forward()`` (a training forward with grad enabled) and returns each piece's cost.

        Frozen 3x3 convs run, and are priced, as torch's direct conv here even where training runs
        them by Winograd (see winograd.direct_convs): that choice comes from a timing probe, and the
        plan must not change with it from one run to the next."""
        counter = flop_counter_mode()
        self.recorder = _Recorder(counter)
        try:
            with counter, direct_convs(), torch.autograd.graph.saved_tensors_hooks(self.recorder.pack,
                                                                                   _never_unpacked):
                forward()
            return self.recorder.costs
        finally:
            self.recorder = None


def _never_unpacked(_):
    raise RuntimeError("the measuring forward of gradient checkpointing is never back-propagated")


def exchange_rate(costs: dict[str, PieceCost], share: float = DENSITY_SHARE) -> float:
    """Bytes per FLOP of recompute below which memory is not worth the compute: ``share`` of the
    densest piece's (0 when no piece saves anything)."""
    return share * max((c.density for c in costs.values() if c.saved_bytes), default=0.0)


def choose_pieces(costs: dict[str, PieceCost], share: float = DENSITY_SHARE) -> set[str]:
    """The pieces worth checkpointing: those saving anything, at the exchange rate or above it."""
    rate = exchange_rate(costs, share)
    return {name for name, c in costs.items() if c.saved_bytes and c.density >= rate}


def describe(costs: dict[str, PieceCost], chosen: set[str]) -> str:
    """One log line: how much activation memory the chosen pieces hold, for what share of recompute."""
    total = sum(c.saved_bytes for c in costs.values()) or 1
    flops = sum(c.recompute_flops for c in costs.values() if c.saved_bytes) or 1
    kept = sum(costs[n].saved_bytes for n in chosen)
    spent = sum(costs[n].recompute_flops for n in chosen)
    return (f"{len(chosen)} of {len(costs)} pieces hold {kept / total:.0%} of the activation memory for "
            f"{spent / flops:.0%} of the recompute ({kept / 2**20:.0f} of {total / 2**20:.0f} MiB)")
