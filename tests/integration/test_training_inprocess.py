"""Training on the real (tiny) SD1.5 model loaded by ComfyUI, in-process: no-op start, learning,
and hooks that never leak into the base model."""
from __future__ import annotations

import pytest
import torch

from loralab.adapters.attach import attach_bypass
from loralab.adapters.network import AdapterNetwork
from loralab.adapters.targets import select_targets
from loralab.sampler.evaluation import heldout_loss, heldout_pairs
from loralab.sampler.lora_training import LoraTrainingRequest, train_lora
from loralab.sampler.train_sampler import TrainConfig
from loralab.sampler.training_set import TrainingSet


def _eval_set(model, latents, positive):
    return TrainingSet(model.model, latents, positive, model.load_device)


def test_fresh_lora_reproduces_the_base_model_exactly(sd15, motif_training_inputs):
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    data = _eval_set(model, latents, positive)
    pairs = heldout_pairs(data, per_image=1)
    base = heldout_loss(model, data, pairs)
    fresh = model.clone()
    network = AdapterNetwork.create(select_targets(model.model.diffusion_model), "lora", 8, 8.0, seed=3)
    attach_bypass(fresh, network)
    assert heldout_loss(fresh, data, pairs) == base
    # ...and a non-zero adapter does change it, so the comparison above is meaningful.
    with torch.no_grad():
        for layer in network.layers:
            layer.lora_down.normal_(0, 0.05)
    assert heldout_loss(fresh, data, pairs) != base
    assert heldout_loss(model, data, pairs) == base  # base patcher unaffected after the switch


def test_training_lowers_heldout_loss(sd15, motif_training_inputs):
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    data = _eval_set(model, latents, positive)
    pairs = heldout_pairs(data, per_image=2)
    before = heldout_loss(model, data, pairs)
    request = LoraTrainingRequest(
        config=TrainConfig(steps=32, learning_rate=2e-3, seed=0), rank=8, alpha=8.0, training_dtype="fp32")
    model.model.requires_grad_(True)  # as ComfyUI loads checkpoints
    result = train_lora(model, latents, positive, request)
    assert not any(p.requires_grad or p.grad is not None for p in model.model.parameters()), \
        "base weights must get no gradient (that is the full-size work bypass mode avoids)"
    after = heldout_loss(result.model, data, pairs)
    assert len(result.losses) == 32
    assert after < 0.9 * before, (before, after)
    assert heldout_loss(model, data, pairs) == before  # training never touched the base model


def test_one_positive_is_repeated_and_a_count_mismatch_names_both(sd15, motif_training_inputs):
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    data = _eval_set(model, latents, positive[:1])
    assert data.size == len(latents) == 8
    crossattn = data.buckets[0].conds["c_crossattn"]
    assert crossattn.shape[0] == 8 and torch.equal(crossattn[0], crossattn[7])
    with pytest.raises(ValueError, match="positive has 3 conditionings but latents has 8 images"):
        _eval_set(model, latents, positive[:3])


def test_a_diverging_run_stops_with_an_error_naming_the_learning_rate(sd15, motif_training_inputs, tmp_path):
    """A learning rate far too high makes the weights NaN: the run stops there, saving nothing
    (no checkpoint of NaN weights either), instead of returning a LoRA that samples black."""
    from loralab.sampler.run_outputs import CheckpointSettings
    from loralab.sampler.train_sampler import TrainingDiverged
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    request = LoraTrainingRequest(config=TrainConfig(steps=6, learning_rate=1.0, optimizer="SGD"), rank=1,
                                  alpha=1024.0, training_dtype="fp32", gradient_checkpointing=False,
                                  checkpoints=CheckpointSettings(output_dir=str(tmp_path), prefix="c", every=1))
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d: .*Lower learning_rate \(now 1\)"):
        train_lora(model, latents[:2], positive[:2], request)
    saved = sorted(tmp_path.glob("*.safetensors"))
    from loralab.adapters.files import load_adapter_file
    assert all(torch.isfinite(t).all() for p in saved for t in load_adapter_file(p)[0].values())
