"""Attaching an AdapterNetwork to a ComfyUI ModelPatcher.

Bypass mode uses ComfyUI's PatcherInjection: on inject, each target layer gets an instance-level
``forward`` returning ``base(x) + strength * f(x)``; on eject it is removed. ComfyUI ejects a
patcher whenever another clone of the same model takes over, so hooks never leak into the base
model (object patches would: 0.3.75 does not restore another clone's object patches).
Weight-wrapper mode uses ``add_weight_wrapper``: ``W + strength * delta`` built on every forward.
"""
from __future__ import annotations

import torch

from comfy.patcher_extension import PatcherInjection

from .network import COMFY_PREFIX, AdapterNetwork

BYPASS_KEY = "loralab_bypass"


def _hooked_forward(module: torch.nn.Module, adapter, output_bias: torch.Tensor | None, strength: float):
    base_forward = type(module).forward

    def forward(x, *args, **kwargs):
        out = base_forward(module, x, *args, **kwargs)
        if adapter is not None:
            out = adapter.bypass(x, out, module, strength)
        if output_bias is not None:
            shape = (-1,) if isinstance(module, torch.nn.Linear) else (-1, *([1] * (out.ndim - 2)))
            out = out + (output_bias * strength).to(out.dtype).view(shape)
        return out

    return forward


def hooked_layers(network: AdapterNetwork, diffusion_model: torch.nn.Module) -> list[str]:
    """The layers whose forward bypass mode replaces: every adapter's, and every Linear/Conv layer
    with a bias offset (added to its output)."""
    biases = network.offsets.output_biases(diffusion_model)
    return list(dict.fromkeys([name for name, _ in network.items()] + list(biases)))


def attach_bypass(model_patcher, network: AdapterNetwork, strength: float = 1.0) -> None:
    """Registers forward hooks for every adapter (and every Linear/Conv bias offset); they are live
    while the patcher is loaded."""
    biases = network.offsets.output_biases(model_patcher.model.diffusion_model)
    layers = hooked_layers(network, model_patcher.model.diffusion_model)
    adapters = dict(network.items())

    def inject(mp):
        diffusion_model = mp.model.diffusion_model
        for name in layers:
            module = diffusion_model.get_submodule(name)
            module.forward = _hooked_forward(module, adapters.get(name), biases.get(name), strength)

    def eject(mp):
        diffusion_model = mp.model.diffusion_model
        for name in layers:
            diffusion_model.get_submodule(name).__dict__.pop("forward", None)

    model_patcher.set_injections(BYPASS_KEY, [PatcherInjection(inject=inject, eject=eject)])
    network.offsets.attach(model_patcher, COMFY_PREFIX, strength, skip=frozenset(biases))


def attach_weight_wrappers(model_patcher, network: AdapterNetwork, strength: float = 1.0) -> None:
    """Applies each adapter as ``merged_weight(W, strength)`` through ComfyUI's weight wrappers."""
    for name, adapter in network.items():
        def wrapper(weight, adapter=adapter):
            return adapter.merged_weight(weight, strength)
        model_patcher.add_weight_wrapper(f"{COMFY_PREFIX}{name}.weight", wrapper)
    network.offsets.attach(model_patcher, COMFY_PREFIX, strength)
