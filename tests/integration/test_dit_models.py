"""Training on DiTs (Flux, SD3): tiny random models built from ComfyUI's own classes (devkit.tiny_dit),
trained with default settings, and the LoRA loaded by ComfyUI's own loader."""
from __future__ import annotations

import logging
import math
import re

import pytest
import torch

import comfy.model_management
import comfy.sd

from devkit.tiny_dit import tiny_inputs, tiny_patcher
from loralab.adapters.keys import to_key_style
from loralab.adapters.network import AdapterNetwork
from loralab.adapters.targets import select_targets
from loralab.sampler.checkpointing import attach_checkpointing
from loralab.sampler.inplace_guard import attach_norm_guard
from loralab.sampler.lora_training import (LoraTrainingRequest, attach, attach_for_training, freeze, release_patcher,
                                           train_lora)
from loralab.sampler.objective import loss_function, model_loss, sample_sigmas
from loralab.sampler.train_sampler import TrainConfig
from loralab.sampler.training_set import TrainingSet

# The default preset's layers: each block's attention and MLP, Flux's fused single-block layers.
BLOCK_LAYERS = {
    "flux": re.compile(r"^(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])"
                       r"|single_blocks\.\d+\.linear[12])$"),
    "sd3": re.compile(r"^joint_blocks\.\d+\.(x|context)_block\.(attn\.(qkv|proj)|mlp\.fc[12])$"),
}
KINDS = {"flux": 10, "sd3": 8}  # layer kinds BLOCK_LAYERS allows, all of which the tiny models have


def _model_output(patcher, latents, positive) -> torch.Tensor:
    """The loaded patcher's prediction on a fixed noised first item."""
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    with torch.no_grad():
        data = TrainingSet(patcher.model, latents, positive, patcher.load_device)
        x0, conds = data.buckets[0].select(torch.tensor([0]))
        sampling = patcher.model.model_sampling
        sigma = torch.tensor([float(sampling.percent_to_sigma(0.5))])
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
        xt = sampling.noise_scaling(sigma, noise, x0, False)
        options = dict(patcher.model_options.get("transformer_options", {}))
        return patcher.model.apply_model(xt, sigma, transformer_options=options, **conds).clone()


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_default_training_makes_a_lora_comfyui_loads(arch, caplog):
    patcher = tiny_patcher(arch)
    latents, positive = tiny_inputs(arch)
    base = _model_output(patcher, latents, positive)
    request = LoraTrainingRequest(config=TrainConfig(steps=2))
    assert request.gradient_checkpointing and request.bypass_mode
    result = train_lora(patcher, latents, positive, request)

    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)
    assert result.checkpointing  # the pieces were measured, and some checkpointed
    names = result.network.names
    assert all(BLOCK_LAYERS[arch].match(n) for n in names), names  # no embedder, in/out or modulation layer
    assert len({re.sub(r"\.\d+\.", ".N.", n) for n in names}) == KINDS[arch]

    hooked = patcher.clone()  # the network as training ran it: forward hooks
    attach(hooked, result.network, bypass=True)
    trained = _model_output(hooked, latents, positive)
    release_patcher(hooked)
    change = (trained - base).abs().max().item()
    assert change > 1e-5
    torch.testing.assert_close(_model_output(result.model, latents, positive), trained, rtol=0, atol=1e-2 * change)
    for style in ("comfyui", "kohya"):
        tensors = dict(result.lora) if style == "comfyui" else to_key_style(dict(result.lora), "kohya",
                                                                           result.lora.kohya_names)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            loaded, _ = comfy.sd.load_lora_for_models(patcher, None, tensors, 1.0, 0)
        assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()], style
        assert len(loaded.patches) == len(names)
        out = _model_output(loaded, latents, positive)
        assert (out - base).abs().max().item() > 0.5 * change
        torch.testing.assert_close(out, trained, rtol=0, atol=1e-2 * change)  # same model, merged weights


def _flux_setup():
    patcher = tiny_patcher("flux")
    freeze(patcher.model)
    latents, positive = tiny_inputs("flux")
    network = AdapterNetwork.create(select_targets(patcher.model.diffusion_model), "lora", 4, 4.0, seed=2)
    with torch.no_grad():
        for layer in network.layers:
            layer.lora_down.normal_(0, 0.05)
    data = TrainingSet(patcher.model, latents, positive, patcher.load_device)
    x0, conds = data.buckets[0].select(torch.tensor([0, 1]))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    sigma = sample_sigmas(patcher.model.model_sampling, torch.tensor([0.3, 0.8]))
    return patcher, network, (x0, conds, noise, sigma)


def _copying_norms(patcher):
    """Every norm of the model normalises a copy: the plain fix, as a reference."""
    for module in patcher.model.diffusion_model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.forward = lambda x, m=module: torch.nn.LayerNorm.forward(m, x.clone())


def test_flux_gradients_match_with_every_fix_in_place():
    """Frozen layers, gradient checkpointing (measured or not) and the learnt norm guard give the
    adapter gradients of plain layers with copying norms, on the step that learns and after."""
    base, network, batch = _flux_setup()
    loss_fn = loss_function("MSE")

    def grads(patcher):
        network.zero_grad(set_to_none=True)
        network.requires_grad_(True)
        with torch.inference_mode(False), torch.enable_grad():
            model_loss(patcher, *batch, loss_fn).backward()
        return {n: p.grad.clone() for n, p in network.named_trainables()}

    reference_patcher = base.clone()
    attach(reference_patcher, network, bypass=True)
    comfy.model_management.load_models_gpu([reference_patcher], force_full_load=True)
    _copying_norms(reference_patcher)
    reference = grads(reference_patcher)
    for module in base.model.diffusion_model.modules():
        module.__dict__.pop("forward", None)
    release_patcher(reference_patcher)
    assert all(g.abs().sum() > 0 for g in reference.values())

    for depth, measured in ((1, True), (1, False), (2, False)):
        patcher = base.clone()
        hooked = attach_for_training(patcher, network, bypass=True)
        guard = attach_norm_guard(patcher)
        plan = attach_checkpointing(patcher, skip=hooked, depth=depth)
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        if measured:
            plan.measure(lambda: model_loss(patcher, *batch, loss_fn))
        for _ in range(2):
            got = grads(patcher)
            for name in reference:
                torch.testing.assert_close(got[name], reference[name], rtol=1e-4, atol=1e-6)
        assert guard.modified and all(re.search(r"(img|txt)_norm[12]$|pre_norm$", n) for n in guard.modified)
        copied = {name: keys for name, keys in plan.copies.modified.items() if keys}
        # at depth 1 the blocks are the pieces: they add to their hidden states; at depth 2 nothing does
        assert copied == ({"double_blocks.0": {"img", "txt"}, "single_blocks.0": {0}} if depth == 1 else {})
        release_patcher(patcher)


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_captions_of_different_token_counts_train_at_any_batch_size(arch):
    """SD3's and Flux's T5 tokens make a caption's conditioning as long as the caption; items of
    one image size but different lengths train (in separate batches) instead of failing to stack."""
    patcher = tiny_patcher(arch)
    latents, positive = tiny_inputs(arch, count=3)
    for pos, tokens in zip(positive, (16, 16, 20)):
        pos[0][0] = torch.randn(1, tokens, pos[0][0].shape[-1], generator=torch.Generator().manual_seed(tokens))
    data = TrainingSet(patcher.model, latents, positive, patcher.load_device)
    assert sorted(tuple(b.conds["c_crossattn"].shape[:2]) for b in data.buckets) == [(1, 20), (2, 16)]
    for batch_size in (1, 2):
        result = train_lora(patcher, latents, positive, LoraTrainingRequest(
            config=TrainConfig(steps=2, batch_size=batch_size), gradient_checkpointing=False))
        assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)


def test_conditioning_is_stacked_on_the_training_device():
    """Text encoders leave their output on their own device; the training set moves it once, so a
    batch's index and its conditioning meet on the training device (here 'meta', standing in for a GPU)."""
    patcher = tiny_patcher("flux")
    latents, positive = tiny_inputs("flux", count=2)
    data = TrainingSet(patcher.model, latents, positive, torch.device("meta"))
    tensors = {name: value for name, value in data.buckets[0].conds.items() if isinstance(value, torch.Tensor)}
    assert {"c_crossattn", "guidance"} <= tensors.keys()
    assert {value.device.type for value in tensors.values()} == {"meta"}
    _, conds = data.draw(2, torch.Generator().manual_seed(0))
    assert conds["c_crossattn"].device.type == "meta"


def test_training_dtype_is_what_the_layers_compute_in_under_a_manual_cast():
    """Weights stored in bf16 and computed in fp32 (ComfyUI's manual cast, e.g. --bf16-unet on a
    CPU): asking for bf16 training must compute in bf16, not in the manual-cast fp32."""
    patcher = tiny_patcher("flux", weight_dtype=torch.bfloat16, manual_cast=torch.float32)
    latents, positive = tiny_inputs("flux")
    seen = set()
    layer = patcher.model.diffusion_model.double_blocks[0].img_attn.proj
    handle = layer.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    try:
        train_lora(patcher, latents, positive, LoraTrainingRequest(config=TrainConfig(steps=1), training_dtype="bf16",
                                                                   gradient_checkpointing=False))
    finally:
        handle.remove()
    assert seen == {torch.bfloat16}


def test_a_16bit_lora_dtype_trains_on_fp32_master_weights_and_saves_16_bits():
    """Adam's squared gradients underflow in fp16 and small updates round away in bf16, so the
    adapter trains in fp32 whatever lora_dtype is; lora_dtype is the dtype it is saved in."""
    latents, positive = tiny_inputs("flux")
    results = {}
    for lora_dtype in ("fp32", "fp16", "bf16"):
        request = LoraTrainingRequest(config=TrainConfig(steps=6, learning_rate=1e-3), training_dtype="fp32",
                                      lora_dtype=lora_dtype, gradient_checkpointing=False)
        results[lora_dtype] = dict(train_lora(tiny_patcher("flux"), latents, positive, request).lora)
    for lora_dtype, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        for key, reference in results["fp32"].items():
            saved = results[lora_dtype][key]
            assert saved.dtype == (dtype if reference.ndim > 0 else reference.dtype), key
            assert torch.equal(saved, reference.to(saved.dtype)), key  # the same training, rounded once
