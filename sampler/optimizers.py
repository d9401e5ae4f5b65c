"""Optimizer choice by name, as the training node offers it."""
from __future__ import annotations

import torch

OPTIMIZERS = {
    "AdamW": torch.optim.AdamW,
    "Adam": torch.optim.Adam,
    "SGD": torch.optim.SGD,
    "RMSprop": torch.optim.RMSprop,
}


def make_optimizer(name: str, params, learning_rate: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer '{name}' is unknown; choose one of {', '.join(OPTIMIZERS)}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    return OPTIMIZERS[name](list(params), lr=learning_rate)
