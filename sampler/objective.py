"""The denoising objective: noising latents at random sigmas and measuring the error.

The loss is taken in the model's own prediction space (epsilon for SD1.5/SDXL, v for v-models,
velocity for flow models), as kohya and diffusers train, rather than on the denoised latent.
ComfyUI's model returns the denoised latent x0_pred; for every model sampling type that is an
affine function of the raw output, x0_pred = a * x_t + b * output, so dividing the x0 error by
|b| gives the raw-output error without knowing the model type.
"""
from __future__ import annotations

import torch

LOSS_FUNCTIONS = {
    "MSE": torch.nn.functional.mse_loss,
    "L1": torch.nn.functional.l1_loss,
    "Huber": torch.nn.functional.huber_loss,
    "SmoothL1": torch.nn.functional.smooth_l1_loss,
}


def loss_function(name: str):
    """The loss callable for a LOSS_FUNCTIONS name; error names the input when unknown."""
    if name not in LOSS_FUNCTIONS:
        raise ValueError(f"loss_function '{name}' is unknown; choose one of {', '.join(LOSS_FUNCTIONS)}")
    return LOSS_FUNCTIONS[name]


def sample_sigmas(model_sampling, uniform: torch.Tensor) -> torch.Tensor:
    """Sigmas for uniform draws in (0, 1), spread over the model's whole noise schedule."""
    percents = uniform.clamp(1e-4, 1 - 1e-4).tolist()
    return torch.tensor([float(model_sampling.percent_to_sigma(p)) for p in percents], dtype=torch.float32)


def output_space_scale(model_sampling, sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    """1/|b| per sample, where b is the model output's coefficient in x0_pred (see module doc)."""
    shape = (sigma.shape[0],) + (1,) * (ndim - 1)
    ones = torch.ones(shape, dtype=sigma.dtype, device=sigma.device)
    coefficient = model_sampling.calculate_denoised(sigma, ones, torch.zeros_like(ones))
    return 1.0 / coefficient.abs().clamp_min(1e-6)


def noised_input(model_sampling, sigma, noise, x0):
    """x_t for the given sigma, in the form the model expects (ComfyUI's noise_scaling)."""
    return model_sampling.noise_scaling(sigma.to(x0.dtype), noise, x0, False)


def denoising_loss(x0_pred: torch.Tensor, x0: torch.Tensor, scale: torch.Tensor, loss_fn,
                   per_item: bool = False) -> torch.Tensor:
    """Loss in prediction space (``scale`` from output_space_scale): the mean, or one per item."""
    scale = scale.to(torch.float32)
    losses = loss_fn(x0_pred.float() * scale, x0.float() * scale, reduction="none")
    per_sample = losses.flatten(1).mean(dim=1)
    return per_sample if per_item else per_sample.mean()


def model_loss(model_patcher, x0, conds, noise, sigma, loss_fn, per_item: bool = False) -> torch.Tensor:
    """Noises ``x0`` at ``sigma``, runs the (loaded) patcher's model and returns its loss."""
    model = model_patcher.model
    sampling = model.model_sampling
    xt = noised_input(sampling, sigma, noise, x0)
    options = dict(model_patcher.model_options.get("transformer_options", {}))
    x0_pred = model.apply_model(xt, sigma, transformer_options=options, **conds)
    return denoising_loss(x0_pred, x0, output_space_scale(sampling, sigma, x0.ndim), loss_fn, per_item)
