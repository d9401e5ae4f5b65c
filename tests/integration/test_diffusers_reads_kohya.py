"""A second, independent client reads our kohya-style SD1.5 LoRA: diffusers' kohya conversion
maps every key onto a module of a diffusers UNet2DConditionModel with the tiny model's config."""
from __future__ import annotations

import pytest
import torch

from loralab.adapters.keys import to_key_style
from loralab.sampler.lora_training import LoraTrainingRequest, train_lora
from loralab.sampler.train_sampler import TrainConfig

diffusers = pytest.importorskip("diffusers")


def _diffusers_unet():
    """The tiny checkpoint's UNet architecture, as diffusers builds it (2 levels, attention in both)."""
    return diffusers.UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320, 640),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8)


@pytest.mark.parametrize("preset", ["attention+feed-forward", "all linear+conv"])
def test_diffusers_maps_every_kohya_key_to_a_unet_module(sd15, motif_training_inputs, preset):
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    request = LoraTrainingRequest(config=TrainConfig(steps=1), rank=4, alpha=4.0, training_dtype="fp32",
                                  gradient_checkpointing=False, target_layers=preset)
    lora = train_lora(model, latents[:1], positive[:1], request).lora
    kohya = to_key_style(dict(lora), "kohya", lora.kohya_names)
    assert all(k.startswith("lora_unet_") for k in kohya)

    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_unet_state_dict_to_peft
    converted, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(kohya))  # raises on leftovers
    assert all(key.startswith("unet.") for key in converted)
    peft = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in converted.items()})
    modules = dict(_diffusers_unet().named_modules())
    layers = set()
    for key in peft:
        path = key.rsplit(".lora_", 1)[0]
        assert path in modules, f"{key} names no module of the diffusers UNet"
        module = modules[path]
        assert isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
        in_dim = module.in_features if isinstance(module, torch.nn.Linear) else module.in_channels
        out_dim = module.out_features if isinstance(module, torch.nn.Linear) else module.out_channels
        if ".lora_A." in key:
            assert peft[key].shape[1] == in_dim, key  # the down matrix fits the module's input
        else:
            assert peft[key].shape[0] == out_dim, key
        layers.add(path)
    assert len(layers) == len(lora.kohya_names) == len({k.split(".")[0] for k in kohya})
    assert len(alphas) == len(layers)
