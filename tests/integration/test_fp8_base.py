"""A base model whose weights are stored in fp8 (ComfyUI's fp8 weight dtype) trains in bypass mode."""
from __future__ import annotations

import torch

import comfy.sd

from loralab.sampler.evaluation import heldout_loss, heldout_pairs
from loralab.sampler.lora_training import LoraTrainingRequest, train_lora
from loralab.sampler.train_sampler import TrainConfig
from loralab.sampler.training_set import TrainingSet


def test_fp8_stored_base_trains_in_bypass_mode_and_loss_decreases(tiny_ckpt, motif_training_inputs):
    model, _, _, _ = comfy.sd.load_checkpoint_guess_config(
        str(tiny_ckpt), output_vae=False, output_clip=False, model_options={"dtype": torch.float8_e4m3fn})
    to_q = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    assert to_q.weight.dtype == torch.float8_e4m3fn
    latents, positive = motif_training_inputs
    data = TrainingSet(model.model, latents, positive, model.load_device)
    pairs = heldout_pairs(data, per_image=2)
    before = heldout_loss(model, data, pairs)
    request = LoraTrainingRequest(config=TrainConfig(steps=16, learning_rate=3e-3, seed=0), rank=8, alpha=8.0,
                                  training_dtype="fp32", bypass_mode=True)
    result = train_lora(model, latents, positive, request)
    after = heldout_loss(result.model, data, pairs)
    assert after < 0.9 * before, (before, after)
    assert to_q.weight.dtype == torch.float8_e4m3fn  # the base stayed in fp8; only the adapter trained
