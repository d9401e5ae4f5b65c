"""Results a checkpointed piece keeps from its forward for its recompute, instead of computing them
twice.

Gradient checkpointing drops a piece's activations after its forward and recomputes them in the
backward. Some results are cheap to keep next to what recomputing them costs: attention's output
(N*C values for 4*N*N*C FLOPs) or the output of a frozen matmul that narrows its input (ff.net.2,
4C -> C). A piece keeps such a result when it costs fewer bytes per FLOP saved than the exchange
rate its checkpoint plan uses to decide which pieces to recompute (``keep_below``, bytes per FLOP):
the same trade of memory for compute, made one result at a time. A kept result that the piece
then modified in place (some DiTs add to a layer's output) is computed again instead.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

import torch


@dataclass
class _PieceResults:
    keep_below: float  # bytes per FLOP: keep results cheaper than this
    values: list = field(default_factory=list)


# The kept results of the checkpointed piece running now (its forward or its recompute), if any.
_RUNNING: contextvars.ContextVar[_PieceResults | None] = contextvars.ContextVar("loralab_piece_results", default=None)


def _detached(value):
    return tuple(t.detach() for t in value) if isinstance(value, tuple) else value.detach()


def _versions(value) -> tuple:
    """Version counters (shared by a tensor and its detached alias): they move when a later op of
    the piece modifies the kept result in place, which would make it the wrong value to hand back."""
    return tuple(t._version for t in value) if isinstance(value, tuple) else (value._version,)


def reuse_in_recompute(compute, flops: int, nbytes: int):
    """``compute()``; inside a checkpointed piece, a result of ``nbytes`` that costs ``flops`` and is
    worth keeping is kept from the piece's forward and handed back, in call order, to its recompute
    without computing it again. Kept tensors come back detached; the caller builds the autograd node.
    """
    piece = _RUNNING.get()
    if piece is None or nbytes >= piece.keep_below * flops:
        return compute()
    if torch._C._current_graph_task_id() < 0:  # the piece's forward
        value = compute()
        kept = _detached(value)
        piece.values.append((kept, _versions(kept)))
        return value
    kept, versions = piece.values.pop(0)
    if _versions(kept) != versions:  # modified in place after the forward kept it: compute it again
        return compute()
    return _detached(kept)


def with_kept_results(forward, keep_below: float | None):
    """``forward`` with a fresh list of kept results, shared by its forward and its recompute (none
    are kept when ``keep_below`` is None)."""
    if keep_below is None:
        return forward
    piece = _PieceResults(keep_below)

    def run(*args, **kwargs):
        token = _RUNNING.set(piece)
        try:
            return forward(*args, **kwargs)
        finally:
            _RUNNING.reset(token)
    return run
