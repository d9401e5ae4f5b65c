"""Optimizer choice by name, as the training node offers it."""
from __future__ import annotations

import inspect

import torch

OPTIMIZERS = {
    "AdamW": torch.optim.AdamW,
    "Adam": torch.optim.Adam,
    "SGD": torch.optim.SGD,
    "RMSprop": torch.optim.RMSprop,
}


def _fused_devices() -> set[str]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return set(_get_fused_kernels_supported_devices())
    except ImportError:  # a torch without fused optimizers
        return set()


def _can_fuse(optimizer_class, params: list[torch.Tensor]) -> bool:
    """Whether torch has a fused step for this optimizer and these parameters: one kernel per
    parameter instead of a dozen elementwise ops (on the CPU torch's default is a per-parameter
    loop, and hundreds of small adapter tensors make that loop a visible part of a step)."""
    if "fused" not in inspect.signature(optimizer_class).parameters:
        return False
    devices = _fused_devices()
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


def make_optimizer(name: str, params, learning_rate: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer '{name}' is unknown; choose one of {', '.join(OPTIMIZERS)}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    params = list(params)
    optimizer_class = OPTIMIZERS[name]
    if _can_fuse(optimizer_class, params):
        return optimizer_class(params, lr=learning_rate, fused=True)
    return optimizer_class(params, lr=learning_rate)
