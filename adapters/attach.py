"""Attaching an AdapterNetwork to a ComfyUI ModelPatcher.

Bypass mode uses ComfyUI's PatcherInjection: on inject, each target layer gets an instance-level
``forward`` returning ``base(x) + strength * f(x)``; on eject it is removed. ComfyUI ejects a
patcher whenever another clone of the same model takes over, so hooks never leak into the base
model (object patches would: 0.3.75 does not restore another clone's object patches).
Weight-wrapper mode uses ``add_weight_wrapper``: ``W + strength * delta`` built on every forward.
"""
from __future__ import annotations

import torch

import comfy.sd
from comfy.patcher_extension import PatcherInjection

from .keys import text_encoder_part
from .network import COMFY_PREFIX, AdapterNetwork

BYPASS_KEY = "loralab_bypass"


def add_output_bias(out: torch.Tensor, bias: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """``out`` plus a per-channel bias: on the last axis for a Linear, on axis 1 for a conv."""
    shape = (-1,) if isinstance(module, torch.nn.Linear) else (-1, *([1] * (out.ndim - 2)))
    return out + bias.to(out.dtype).view(shape)


def own_forward(module: torch.nn.Module):
    """The layer class's own forward, plus a bias offset on its output (``output_bias``): what a
    hooked layer computes before its adapter is added."""
    own = type(module).forward

    def forward(module, x, *args, output_bias: torch.Tensor | None = None, **kwargs):
        out = own(module, x, *args, **kwargs)
        return out if output_bias is None else add_output_bias(out, output_bias, module)

    return forward


def _hooked_forward(module: torch.nn.Module, adapter, output_bias: torch.Tensor | None, strength: float,
                    base_forward_of=own_forward):
    base_forward = base_forward_of(module)
    bias_after = adapter is not None and adapter.transforms_base_output

    def forward(x, *args, **kwargs):
        bias = None if output_bias is None else (output_bias if strength == 1.0 else output_bias * strength)
        if bias is not None and not bias_after:
            kwargs["output_bias"] = bias
        out = base_forward(module, x, *args, **kwargs)
        if adapter is not None:
            out = adapter.bypass(x, out, module, strength)
        return add_output_bias(out, bias, module) if bias is not None and bias_after else out

    return forward


def bypass_hooks(network: AdapterNetwork, diffusion_model: torch.nn.Module) -> dict[str, tuple]:
    """(adapter or None, output bias offset or None) by layer, for every layer whose forward bypass
    mode replaces: each adapter's, and each Linear/Conv layer with a bias offset."""
    biases = network.offsets.output_biases(diffusion_model)
    hooks = {name: (adapter, biases.get(name)) for name, adapter in network.items()}
    hooks.update({name: (None, bias) for name, bias in biases.items() if name not in hooks})
    return hooks


def attach_bypass(model_patcher, network: AdapterNetwork, strength: float = 1.0, base_forward_of=own_forward) -> None:
    """Registers forward hooks for every adapter (and every Linear/Conv bias offset); they are live
    while the patcher is loaded. ``base_forward_of(layer)`` gives the base computation each hook
    adds to, given the layer's bias offset as ``output_bias`` (training passes one that keeps nothing
    for a frozen weight's backward and feeds the offset to the op as part of its bias)."""
    hooks = bypass_hooks(network, model_patcher.model.diffusion_model)

    def inject(mp):
        diffusion_model = mp.model.diffusion_model
        for name, (adapter, bias) in hooks.items():
            module = diffusion_model.get_submodule(name)
            module.forward = _hooked_forward(module, adapter, bias, strength, base_forward_of)

    def eject(mp):
        diffusion_model = mp.model.diffusion_model
        for name in hooks:
            diffusion_model.get_submodule(name).__dict__.pop("forward", None)

    model_patcher.set_injections(BYPASS_KEY, [PatcherInjection(inject=inject, eject=eject)])
    on_output = frozenset(name for name, (_, bias) in hooks.items() if bias is not None)
    network.offsets.attach(model_patcher, COMFY_PREFIX, strength, skip=on_output)


def attach_weight_wrappers(model_patcher, network: AdapterNetwork, strength: float = 1.0) -> None:
    """Applies each adapter as ``merged_weight(W, strength)`` through ComfyUI's weight wrappers."""
    for name, adapter in network.items():
        def wrapper(weight, adapter=adapter):
            return adapter.merged_weight(weight, strength)
        model_patcher.add_weight_wrapper(f"{COMFY_PREFIX}{name}.weight", wrapper)
    network.offsets.attach(model_patcher, COMFY_PREFIX, strength)


def with_lora_patches(model_patcher, lora: dict, strength: float = 1.0):
    """A clone of ``model_patcher`` carrying ``lora`` (a LORA_MODEL) as ComfyUI's own weight patches,
    as its LoRA loaders apply a file. Unlike hooks or wrappers, patches travel with every later
    clone: a second training run builds on them, and ModelSave or model merging see the LoRA."""
    if strength == 0:
        return model_patcher
    text_encoder = text_encoder_part(lora)  # a continued file's, carried for saving only
    diffusion = {k: v for k, v in lora.items() if k not in text_encoder}
    patched, _ = comfy.sd.load_lora_for_models(model_patcher, None, diffusion, strength, 0)
    return patched
