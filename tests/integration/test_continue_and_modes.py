"""Continuing training from a saved file, and bypass vs weight-wrapper equivalence, on the real
tiny SD1.5 model loaded by ComfyUI in-process."""
from __future__ import annotations

import pytest
import torch

import comfy.model_management

from loralab.adapters.files import load_adapter_file, save_adapter_file
from loralab.adapters.network import AdapterNetwork
from loralab.adapters.targets import DEFAULT_PRESET, select_targets
from loralab.sampler import train_state
from loralab.sampler.lora_training import ExistingAdapter, LoraTrainingRequest, attach_for_training, train_lora
from loralab.sampler.objective import loss_function, model_loss, sample_sigmas
from loralab.sampler.train_sampler import TrainConfig
from loralab.sampler.training_set import TrainingSet


def _request(steps, existing=None, **kw):
    return LoraTrainingRequest(config=TrainConfig(steps=steps, learning_rate=1e-3, seed=7), rank=4, alpha=4.0,
                               training_dtype="fp32", gradient_checkpointing=False, existing=existing, **kw)


def _save(result, folder, name):
    path = folder / f"{name}.safetensors"
    save_adapter_file(path, dict(result.lora), result.lora.metadata)
    train_state.save(train_state.state_path_for(path), *result.lora.train_state)
    return path


def _weights(network):
    return {n: p.detach().clone() for n, p in network.named_trainables()}


def test_continue_with_state_equals_one_uninterrupted_run(sd15, motif_training_inputs, tmp_path):
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    whole = train_lora(model, latents, positive, _request(6))
    first = train_lora(model, latents, positive, _request(3))
    path = _save(first, tmp_path, "first")
    tensors, metadata = load_adapter_file(path)
    state = train_state.load(train_state.state_path_for(path))
    assert state is not None
    resumed = train_lora(model, latents, positive, _request(3, ExistingAdapter(tensors, metadata, state, path.name)))
    assert resumed.total_steps == 6
    a, b = _weights(whole.network), _weights(resumed.network)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # without the state the weights start from the file's but the optimizer starts afresh
    fresh = train_lora(model, latents, positive, _request(3, ExistingAdapter(tensors, metadata, None, path.name)))
    c = _weights(fresh.network)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    start = AdapterNetwork.from_state_dict(dict(model.model.diffusion_model.named_modules()), tensors)[0]
    assert any(not torch.equal(p, c[n]) for n, p in _weights(start).items())  # it did train on


@pytest.mark.parametrize("norm_bias", [False, True], ids=["adapters", "adapters+norm/bias offsets"])
def test_bypass_and_weight_wrappers_give_same_outputs_and_gradients(sd15, motif_training_inputs, norm_bias):
    """Bypass hooks and weight wrappers agree, attached as training attaches them (bypass mode runs
    every base layer as a frozen layer); with norm/bias offsets too, whose Linear/Conv bias
    offsets bypass mode adds to the layer output instead of passing them through the op's bias."""
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    dm = model.model.diffusion_model
    targets = select_targets(dm, "all linear+conv" if norm_bias else DEFAULT_PRESET)
    network = AdapterNetwork.create(targets, "lora", 4, 4.0, seed=1, offsets_of=dm if norm_bias else None)
    with torch.no_grad():
        for layer in network.layers:
            layer.lora_down.normal_(0, 0.02)
        for _, value in network.offsets.items():
            value.normal_(0, 0.02)
    assert (len(network.offsets) > 0) == norm_bias
    assert (len(network.offsets.output_biases(dm)) > 0) == norm_bias
    data = TrainingSet(model.model, latents[:2], positive[:2], model.load_device)
    x0, conds = data.buckets[0].select(torch.tensor([0, 1]))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    sigma = sample_sigmas(model.model.model_sampling, torch.tensor([0.3, 0.8]))
    results = []
    for bypass in (True, False):
        patcher = model.clone()
        attach_for_training(patcher, network, bypass)
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        network.zero_grad(set_to_none=True)
        network.requires_grad_(True)
        with torch.inference_mode(False), torch.enable_grad():
            loss = model_loss(patcher, x0, conds, noise, sigma, loss_function("MSE"))
            loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in network.named_trainables()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads_a.values())
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-3, atol=1e-6)


def test_offloading_computes_the_same_training(sd15, motif_training_inputs, caplog):
    """With offloading, ComfyUI's low-VRAM loader streams every base weight; the result is the same."""
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    plain = train_lora(model, latents[:2], positive[:2], _request(2))
    with caplog.at_level("INFO"):
        offloaded = train_lora(model, latents[:2], positive[:2], _request(2, offloading=True))
    assert "loaded partially" in caplog.text  # the streaming path really ran
    a, b = _weights(plain.network), _weights(offloaded.network)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)
    assert plain.losses == pytest.approx(offloaded.losses, rel=1e-5)
    with pytest.raises(ValueError, match="offloading needs bypass_mode"):
        train_lora(model, latents[:1], positive[:1], _request(1, offloading=True, bypass_mode=False))


def _prediction(patcher, latents, positive) -> torch.Tensor:
    """The loaded patcher's prediction on a fixed noised first image."""
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    with torch.no_grad():
        x0, conds = TrainingSet(patcher.model, latents[:1], positive[:1], patcher.load_device).buckets[0].select(
            torch.tensor([0]))
        sigma = torch.tensor([2.0])
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
        xt = patcher.model.model_sampling.noise_scaling(sigma, noise, x0, False)
        return patcher.model.apply_model(xt, sigma, **conds).clone()


def test_training_on_a_trained_model_builds_on_its_lora(sd15, motif_training_inputs):
    """Train LoRA's model output carries the LoRA into what follows it: a second run trains on
    base + the first LoRA, and its output keeps both (it kept only its own when the output carried
    hooks that the next attach replaced)."""
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    request = LoraTrainingRequest(config=TrainConfig(steps=2, learning_rate=0.02, seed=3), rank=4)
    first = train_lora(model, latents, positive, request)
    base, trained = _prediction(model, latents, positive), _prediction(first.model, latents, positive)
    moved = (trained - base).abs().max()
    assert moved > 0.05

    tiny_step = LoraTrainingRequest(config=TrainConfig(steps=1, learning_rate=1e-9, seed=4), rank=4)
    second = train_lora(first.model, latents, positive, tiny_step)
    assert (_prediction(second.model, latents, positive) - trained).abs().max() < moved / 20
    on_base = train_lora(model, latents, positive, tiny_step)
    assert second.losses != on_base.losses  # the second run saw the first LoRA


def test_trained_model_output_bakes_the_lora_into_saved_weights(sd15, motif_training_inputs):
    """Nodes that read weights (ModelSave, CheckpointSave, model merging) load the model with its
    patches applied; the trained LoRA must be among them."""
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    result = train_lora(model, latents[:2], positive[:2], LoraTrainingRequest(
        config=TrainConfig(steps=1, learning_rate=0.02), rank=4, gradient_checkpointing=False))
    name = next(n for n, _ in model.model.diffusion_model.named_modules() if n.endswith("attn1.to_q"))
    weight = f"diffusion_model.{name}.weight"
    base = model.model.state_dict()[weight].clone()
    comfy.model_management.load_models_gpu([result.model], force_patch_weights=True)
    try:
        baked = result.model.model.state_dict()[weight].clone()
    finally:
        comfy.model_management.unload_all_models()
    assert not torch.allclose(baked, base)
    assert torch.equal(model.model.state_dict()[weight], base)  # unloaded: the base weights are back


def test_a_sidecar_left_beside_a_replaced_file_is_not_used(sd15, motif_training_inputs, tmp_path, caplog):
    """The .trainstate is matched to its file by name; after the file is replaced by another run's
    (same settings, other steps), the old sidecar's moments, RNG and step must not be applied."""
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    old = _save(train_lora(model, latents, positive, _request(3)), tmp_path, "old")
    replaced = train_lora(model, latents, positive, _request(2))
    path = tmp_path / "new.safetensors"
    save_adapter_file(path, dict(replaced.lora), replaced.lora.metadata)
    (tmp_path / "new.trainstate").write_bytes(train_state.state_path_for(old).read_bytes())
    tensors, metadata = load_adapter_file(path)
    stale = train_state.load(train_state.state_path_for(path))
    with caplog.at_level("WARNING", logger="loralab"):
        result = train_lora(model, latents, positive, _request(1, ExistingAdapter(tensors, metadata, stale, path.name)))
    assert "of step 3 but the file of step 2" in caplog.text
    assert result.total_steps == 3  # the file's 2 steps and 1 more, not the sidecar's 3
    fresh = train_lora(model, latents, positive, _request(1, ExistingAdapter(tensors, metadata, None, path.name)))
    a, b = _weights(result.network), _weights(fresh.network)
    assert all(torch.equal(a[n], b[n]) for n in a)  # exactly as continuing from the weights alone
