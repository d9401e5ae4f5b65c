"""Layer names of kohya-style files on full-size UNets (meta device): SD1.x in diffusers naming,
SDXL in its own module paths, as kohya sd-scripts writes each; either naming reads back."""
import pytest
import torch

from devkit.tiny_dit import meta_model
from loralab.adapters.keys import diffusers_layer_names, kohya_layer_names, to_comfy_keys
from loralab.adapters.targets import DEFAULT_PRESET, select_targets


@pytest.fixture(scope="module")
def models():
    return {arch: meta_model(arch) for arch in ("sd15", "sdxl")}


def _targets(model):
    return [t.name for t in select_targets(model.diffusion_model, DEFAULT_PRESET)]


def test_sdxl_files_name_layers_by_their_own_module_path(models):
    layers = _targets(models["sdxl"])
    names = kohya_layer_names(models["sdxl"], layers)
    assert all(names[layer] == "lora_unet_" + layer.replace(".", "_") for layer in layers)
    assert names["input_blocks.4.1.proj_in"] == "lora_unet_input_blocks_4_1_proj_in"


def test_sd15_files_keep_the_diffusers_names(models):
    names = kohya_layer_names(models["sd15"], _targets(models["sd15"]))
    assert names["input_blocks.1.1.proj_in"] == "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert names["output_blocks.11.1.transformer_blocks.0.attn2.to_k"] == \
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k"


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_either_naming_reads_back_to_the_same_layer(models, arch):
    model = models[arch]
    modules = dict(model.diffusion_model.named_modules())
    layer = "input_blocks.4.1.proj_in"
    tensor = torch.zeros(2, 2)
    files = ({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": tensor},
             {"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": tensor})
    for tensors in files:
        comfy_keys, unmatched = to_comfy_keys(tensors, modules, diffusers_layer_names(model, [layer]))
        assert unmatched == [] and list(comfy_keys) == [f"diffusion_model.{layer}.lora_down.weight"]
