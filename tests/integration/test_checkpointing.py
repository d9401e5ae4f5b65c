"""Gradient checkpointing at every depth computes the same adapter gradients as none at all, and
checkpoints only pieces whose recompute buys memory."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

import comfy.model_management

from loralab.adapters.network import AdapterNetwork
from loralab.adapters.targets import select_targets
from loralab.sampler.checkpointing import attach_checkpointing, checkpoint_units
from loralab.sampler.lora_training import attach, attach_for_training, release_patcher
from loralab.sampler.objective import loss_function, model_loss, sample_sigmas
from loralab.sampler.training_set import TrainingSet


@pytest.fixture(scope="module")
def setup(sd15, motif_training_inputs):
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    network = AdapterNetwork.create(select_targets(model.model.diffusion_model), "lora", 4, 4.0, seed=2)
    with torch.no_grad():
        for layer in network.layers:
            layer.lora_down.normal_(0, 0.02)
    data = TrainingSet(model.model, latents[:2], positive[:2], model.load_device)
    x0, conds = data.buckets[0].select(torch.tensor([0, 1]))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    sigma = sample_sigmas(model.model.model_sampling, torch.tensor([0.2, 0.7]))
    return model, network, (x0, conds, noise, sigma)


def _grads(model, network, batch, depth, frozen_layers=True):
    """Adapter gradients with checkpointing at ``depth`` (0: none), attached as training attaches
    (frozen base layers) or, with ``frozen_layers=False``, as plain hooks over torch's own layers."""
    patcher = model.clone()
    if frozen_layers:
        attach_for_training(patcher, network, bypass=True)
    else:
        attach(patcher, network, bypass=True)
    count = len(attach_checkpointing(patcher, skip=set(network.names), depth=depth)) if depth else 0
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    network.zero_grad(set_to_none=True)
    network.requires_grad_(True)
    with torch.inference_mode(False), torch.enable_grad():
        model_loss(patcher, *batch, loss_function("MSE")).backward()
    release_patcher(patcher)
    return count, {n: p.grad.clone() for n, p in network.named_trainables()}


def test_every_depth_matches_no_checkpointing(setup):
    model, network, batch = setup
    _, reference = _grads(model, network, batch, 0, frozen_layers=False)
    assert any(g.abs().sum() > 0 for g in reference.values())
    counts = []
    for depth in range(0, 6):
        count, grads = _grads(model, network, batch, depth)
        counts.append(count)
        for name in reference:
            torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-7)
    counts = counts[1:]
    assert counts[0] > 0 and counts == sorted(counts) and counts[-1] > counts[0]  # deeper = finer pieces


def test_depth_out_of_range_is_refused(setup):
    model, network, _ = setup
    with pytest.raises(ValueError, match="checkpoint_depth must be 1 to 5"):
        attach_checkpointing(model.clone(), depth=6)


def test_units_never_include_adapter_targets(setup):
    model, network, _ = setup
    for depth in range(1, 6):
        assert not set(checkpoint_units(model.model.diffusion_model, set(network.names), depth=depth)) & set(network.names)


def test_single_layers_are_never_units(setup):
    model, network, _ = setup
    dm = model.model.diffusion_model
    for depth in range(1, 6):
        names = checkpoint_units(dm, set(network.names), depth=depth)
        assert names and all(any(True for _ in dm.get_submodule(n).children()) for n in names)
        assert not {"input_blocks.0.0", "out.2", "time_embed.0"} & set(names)


def test_measured_plan_recomputes_only_the_chosen_pieces_and_never_the_last(setup):
    """After the measuring forward, the transformer blocks (dense in activation memory) are
    checkpointed and the ResBlocks (convs, little memory per FLOP) are not; the piece that runs last
    is not recomputed either. Gradients stay those of no checkpointing, over two steps."""
    model, network, batch = setup
    _, reference = _grads(model, network, batch, 0, frozen_layers=False)
    dm = model.model.diffusion_model
    names = checkpoint_units(dm, set(network.names), depth=1)
    calls = Counter()

    def counting(name, forward):
        def run(*args, **kwargs):
            calls[name] += 1
            return forward(*args, **kwargs)
        return run

    for name in names:  # under the checkpoint wrapper, so recomputes are counted too
        dm.get_submodule(name).forward = counting(name, dm.get_submodule(name).forward)
    patcher = model.clone()
    attach_for_training(patcher, network, bypass=True)
    plan = attach_checkpointing(patcher, skip=set(network.names), depth=1)
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    try:
        network.requires_grad_(True)
        with torch.inference_mode(False):
            plan.measure(lambda: model_loss(patcher, *batch, loss_function("MSE")))
        for _ in range(2):
            calls.clear()
            network.zero_grad(set_to_none=True)
            with torch.inference_mode(False), torch.enable_grad():
                model_loss(patcher, *batch, loss_function("MSE")).backward()
            for name in reference:
                torch.testing.assert_close(dict(network.named_trainables())[name].grad, reference[name],
                                           rtol=1e-5, atol=1e-7)
    finally:
        release_patcher(patcher)
        for name in names:
            dm.get_submodule(name).__dict__.pop("forward", None)
    kinds = {name: type(dm.get_submodule(name)).__name__ for name in names}
    transformers = {n for n, k in kinds.items() if k == "SpatialTransformer"}
    resblocks = {n for n, k in kinds.items() if k == "ResBlock"}
    assert plan.chosen == transformers
    assert sum(plan.costs[n].saved_bytes for n in transformers) > 0.8 * sum(c.saved_bytes for c in plan.costs.values())
    last = names[-1]
    assert last in transformers and calls[last] == 1  # runs last: kept, not recomputed
    assert all(calls[n] == 2 for n in transformers - {last})  # run, then recomputed in the backward
    assert all(calls[n] == 1 for n in resblocks)


def test_frozen_tail_layers_of_a_piece_are_not_recomputed(setup):
    """A ResBlock's second conv and skip conv save nothing for the backward and nothing after them in
    the block does, so the recompute stops before them: each runs once per step, while the first
    conv, whose output the second norm keeps, runs again in the backward."""
    model, network, batch = setup
    dm = model.model.diffusion_model
    block = "middle_block.0"  # a ResBlock that is checkpointed (not the piece that runs last)
    assert block in checkpoint_units(dm, set(network.names), depth=1)
    layers = {"first conv": f"{block}.in_layers.2", "second conv": f"{block}.out_layers.3"}
    calls = Counter()
    from loralab.sampler import frozen_layers
    real_conv = frozen_layers._FrozenConv.forward

    def counting_frozen(ctx, x, layer, bias_offset):
        for label, name in layers.items():
            if dm.get_submodule(name) is layer.module:
                calls[label] += 1
        return real_conv(ctx, x, layer, bias_offset)

    frozen_layers._FrozenConv.forward = staticmethod(counting_frozen)
    try:
        _, reference = _grads(model, network, batch, 0, frozen_layers=False)
        calls.clear()
        _, grads = _grads(model, network, batch, 1)
    finally:
        frozen_layers._FrozenConv.forward = staticmethod(real_conv)
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-7)
    assert calls["first conv"] == 2
    assert calls["second conv"] == 1


def test_results_worth_keeping_are_not_recomputed_and_gradients_stay_exact(setup, monkeypatch):
    """At 256 px, the measured plan's exchange rate keeps a long self-attention's output (1024
    tokens: 1 byte per 1000 FLOPs) from a checkpointed piece's forward for its recompute, and
    recomputes the short ones (256 tokens, or 77 context tokens); the feed-forward output layer
    (4C -> C) keeps its output too. Adapter gradients stay those of no checkpointing."""
    from loralab.sampler import attention as training_attention_module
    from loralab.sampler import frozen_layers
    from loralab.sampler.attention import use_fused_attention

    model, network, (x0, conds, noise, sigma) = setup
    batch = (torch.nn.functional.interpolate(x0, size=(32, 32)), conds,
             torch.nn.functional.interpolate(noise, size=(32, 32)), sigma)  # 256 px latents
    flash = Counter()
    real_flash = training_attention_module._flash_forward

    def counting_flash(q, k, v):
        flash[(q.shape[2], k.shape[2])] += 1
        return real_flash(q, k, v)

    matmuls = Counter()
    real_matmul = frozen_layers._matmul

    def counting_matmul(x, weight, bias, onednn):
        matmuls[(*weight.shape, x.numel() // x.shape[-1])] += 1
        return real_matmul(x, weight, bias, onednn)

    monkeypatch.setattr(training_attention_module, "_flash_forward", counting_flash)
    monkeypatch.setattr(frozen_layers, "_matmul", counting_matmul)

    def grads(depth):
        patcher = model.clone()
        assert use_fused_attention(patcher)
        attach_for_training(patcher, network, bypass=True)
        plan = attach_checkpointing(patcher, skip=set(network.names), depth=depth) if depth else None
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        network.zero_grad(set_to_none=True)
        network.requires_grad_(True)
        with torch.inference_mode(False), torch.enable_grad():
            if plan is not None:
                plan.measure(lambda: model_loss(patcher, *batch, loss_function("MSE")))
            flash.clear()
            matmuls.clear()
            model_loss(patcher, *batch, loss_function("MSE")).backward()
        release_patcher(patcher)
        return {n: p.grad.clone() for n, p in network.named_trainables()}

    reference = grads(0)
    plain_flash, plain_matmuls = dict(flash), dict(matmuls)
    checkpointed = grads(1)
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], rtol=1e-5, atol=1e-7)
    # 3 level-1 transformers (1024 tokens), 4 level-2 (256 tokens); each with a 77-token cross-attention
    assert plain_flash == {(1024, 1024): 3, (256, 256): 4, (1024, 77): 3, (256, 77): 4}
    # 2 of each kind are recomputed at level 1 (the third runs last), all 4 at level 2
    assert dict(flash) == {(1024, 1024): 3, (256, 256): 4 + 4, (1024, 77): 3 + 2, (256, 77): 4 + 4}
    # forward products are keyed by the weight's [out, in] shape and the tokens of the batch of 2
    # (the backward's by the weight's transpose)
    ff_out = {(320, 1280, 2048): 3, (640, 2560, 512): 4}  # the feed-forward output layers: kept
    for shape, count in ff_out.items():
        assert plain_matmuls[shape] == count
        assert matmuls[shape] == count
    ff_in = {(2560, 320, 2048): 3, (5120, 640, 512): 4}  # the feed-forward input layers (C -> 8C): recomputed
    for shape, count in ff_in.items():
        assert plain_matmuls[shape] == count
        assert matmuls[shape] > count
