"""Held-out denoising loss: a fixed set of (image, noise, sigma) triples, evaluated without grad.

Training losses are noisy (each step draws new noise and sigmas), so progress is judged on the
same triples before and after training, drawn from a generator seeded apart from training.
"""
from __future__ import annotations

import torch

import comfy.model_management

from .objective import loss_function, model_loss, sample_sigmas
from .training_set import TrainingSet


def heldout_pairs(data: TrainingSet, per_image: int = 4, seed: int = 1234) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(bucket index, noise [n, C, H, W], uniform draws [n] mapped to sigmas) per bucket, ``per_image`` per image."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for b, bucket in enumerate(data.buckets):
        n = len(bucket) * per_image
        noise = torch.randn((n, *bucket.latents.shape[1:]), generator=g)
        uniform = (torch.arange(n, dtype=torch.float32) + torch.rand(n, generator=g)) / n  # stratified
        pairs.append((b, noise, uniform))
    return pairs


@torch.no_grad()
def heldout_loss(model_patcher, data: TrainingSet, pairs, loss_name: str = "MSE", batch_size: int = 4) -> float:
    """Mean prediction-space loss of ``model_patcher`` over the held-out triples."""
    comfy.model_management.load_models_gpu([model_patcher], force_full_load=True)
    sampling = model_patcher.model.model_sampling
    fn = loss_function(loss_name)
    losses = []
    for b, noise, uniform in pairs:
        bucket = data.buckets[b]
        sigmas = sample_sigmas(sampling, uniform)
        for start in range(0, noise.shape[0], batch_size):
            idx = torch.arange(start, min(start + batch_size, noise.shape[0]))
            x0, conds = bucket.select(idx % len(bucket))
            eps = noise[idx].to(x0.device, x0.dtype)
            losses.append(model_loss(model_patcher, x0, conds, eps, sigmas[idx].to(x0.device), fn, per_item=True))
    return float(torch.cat(losses).mean())
