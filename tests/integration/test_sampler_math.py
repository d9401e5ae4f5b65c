"""TrainSampler arithmetic on the real model: gradient accumulation and 16-bit compute."""
from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from loralab.adapters.network import AdapterNetwork
from loralab.adapters.targets import select_targets
from loralab.sampler import lora_training
from loralab.sampler.bf16_weights import Bf16Weights
from loralab.sampler.lora_training import LoraTrainingRequest, attach, load_for_training, release_patcher, train_lora
from loralab.sampler.train_sampler import TrainConfig, TrainSampler
from loralab.sampler.training_set import TrainingSet


class ScriptedSampler(TrainSampler):
    """Draws the given micro-batches in order instead of random ones."""

    def __init__(self, *args, batches, **kw):
        super().__init__(*args, **kw)
        self.batches = list(batches)

    def draw(self):
        return self.batches.pop(0)


def test_accumulating_k_single_images_equals_one_batch_of_k(sd15, motif_training_inputs):
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    k = 3
    data = TrainingSet(model.model, latents[:k], positive[:k], model.load_device)
    x0, conds = data.buckets[0].select(torch.arange(k))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([0.5, 2.0, 8.0])
    singles = [(x0[i:i + 1], {n: c[i:i + 1] for n, c in conds.items()}, noise[i:i + 1], sigma[i:i + 1]) for i in range(k)]
    results = []
    for batch_size, accumulate, batches in ((k, 1, [(x0, conds, noise, sigma)]), (1, k, singles)):
        network = AdapterNetwork.create(select_targets(model.model.diffusion_model), "lora", 4, 4.0, seed=5)
        with torch.no_grad():
            for layer in network.layers:
                layer.lora_down.normal_(0, 0.02, generator=torch.Generator().manual_seed(6))
        network.requires_grad_(True)
        initial = {n: p.detach().clone() for n, p in network.named_trainables()}
        patcher = model.clone()
        attach(patcher, network, bypass=True)
        load_for_training(patcher, offload=False)
        config = TrainConfig(steps=1, batch_size=batch_size, grad_accumulation_steps=accumulate, learning_rate=1.0,
                             optimizer="SGD")
        sampler = ScriptedSampler(patcher, network.named_trainables(), data, config, batches=batches)
        with torch.inference_mode(False), torch.enable_grad():
            loss = sampler.step()
        release_patcher(patcher)
        results.append((loss, {n: p.detach().clone() for n, p in network.named_trainables()}))
    (loss_batch, w_batch), (loss_acc, w_acc) = results
    assert loss_batch == pytest.approx(loss_acc, rel=1e-5)
    assert any(not torch.equal(w_batch[n], initial[n]) for n in w_batch)  # the step really moved weights
    for name in w_batch:  # SGD with lr 1: equal weights after the step means equal gradients
        torch.testing.assert_close(w_batch[name], w_acc[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_16bit_compute_keeps_fp32_master_weights(sd15, motif_training_inputs, dtype):
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    request = LoraTrainingRequest(config=TrainConfig(steps=2, learning_rate=1e-3), rank=4, alpha=4.0,
                                  training_dtype=dtype, lora_dtype="auto", gradient_checkpointing=False)
    result = train_lora(model, latents[:2], positive[:2], request)
    assert all(math.isfinite(loss) for loss in result.losses)
    params = dict(result.network.named_trainables())
    assert all(p.dtype == torch.float32 for p in params.values())
    assert any(p.abs().sum() > 0 for n, p in params.items() if n.endswith("lora_down"))  # it trained (down starts at zero)
    assert result.lora.metadata["ss_mixed_precision"] == dtype
    # fp16 compute scales its loss (and saves the scale with the run's state); bf16 needs no scaling
    saved_scale = result.lora.train_state[1].get("loss_scale")
    assert (json.loads(saved_scale)["scale"] > 1 if dtype == "fp16" else saved_scale is None)


@pytest.mark.parametrize("algorithm", ["lora", "dora"])
def test_bf16_run_holds_frozen_weights_as_bf16_and_gives_them_back_bit_for_bit(sd15, motif_training_inputs,
                                                                               algorithm):
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    dm = model.model.diffusion_model
    layers = {n: m for n, m in dm.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    before = {n: p.detach().clone() for n, p in dm.named_parameters()}
    during = {}

    def on_step(report):
        during.update({n: m.weight.dtype for n, m in layers.items()})

    request = LoraTrainingRequest(config=TrainConfig(steps=2, learning_rate=1e-3), algorithm=algorithm, rank=4,
                                  alpha=4.0, training_dtype="bf16", gradient_checkpointing=True)
    result = train_lora(model, latents[:2], positive[:2], request, on_step=on_step)
    adapted = set(result.network.names)
    assert adapted and len(adapted) < len(layers)
    assert {during[n] for n in layers if n not in adapted} == {torch.bfloat16}
    # DoRA reads the base weight for its column norms, so its layers keep the stored fp32 weight
    assert {during[n] for n in adapted} == {torch.float32 if algorithm == "dora" else torch.bfloat16}
    after = dict(dm.named_parameters())
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name


def test_bf16_run_with_held_weights_trains_as_with_a_cast_per_call(sd15, motif_training_inputs, monkeypatch):
    """Held weights differ from torch's cast only at exact rounding ties (1 in 65536 values). In
    bf16 any such difference grows to bf16's rounding noise within a few layers, so the updates of
    the two runs (SGD: the update is the gradient) must differ by no more than a bf16 run differs
    from the fp32 run."""
    model, _, _ = sd15
    latents, positive = motif_training_inputs

    def run(dtype):
        request = LoraTrainingRequest(config=TrainConfig(steps=2, learning_rate=1.0, seed=2, optimizer="SGD"), rank=4,
                                      alpha=4.0, training_dtype=dtype, gradient_checkpointing=True)
        return train_lora(model, latents[:2], positive[:2], request)

    held, fp32 = run("bf16"), run("fp32")
    monkeypatch.setattr(lora_training, "bf16_weights_for",
                        lambda mp, *args: Bf16Weights(mp.model.diffusion_model, [], mp.load_device))
    cast = run("bf16")
    assert held.losses == pytest.approx(cast.losses, rel=2e-3)
    a, b, c = (dict(r.network.named_trainables()) for r in (held, cast, fp32))
    downs = [n for n in a if n.endswith("lora_down")]  # zero at the start: what they hold is the update
    assert all(a[n].abs().sum() > 0 for n in downs)

    def distance(x, y, name):
        return float(torch.linalg.vector_norm(x[name] - y[name]) / torch.linalg.vector_norm(y[name]))

    held_vs_cast = statistics.median(distance(a, b, n) for n in downs)
    bf16_noise = statistics.median(distance(b, c, n) for n in downs)
    assert held_vs_cast <= 1.5 * bf16_noise


def test_long_and_short_captions_are_batched_apart_without_padding(sd15, motif_training_inputs):
    """On SD1.5, ComfyUI's join pads cross-attention to a common multiple of 77 tokens and refuses
    past 4x (77 with 385 tokens); the training set keeps each token count in its own bucket."""
    model, _, _ = sd15
    latents, _ = motif_training_inputs
    width = model.model.model_config.unet_config["context_dim"]
    tokens = (77, 385, 77, 154)
    positive = [[[torch.randn(1, n, width), {}]] for n in tokens]
    data = TrainingSet(model.model, latents[:4], positive, model.load_device)
    lengths = sorted((b.conds["c_crossattn"].shape[1], len(b)) for b in data.buckets)
    assert lengths == [(77, 2), (154, 1), (385, 1)]
    seen = set()
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        x0, conds = data.draw(2, generator)
        seen.add((x0.shape[0], conds["c_crossattn"].shape[1]))
    assert seen == {(2, 77), (1, 154), (1, 385)}
