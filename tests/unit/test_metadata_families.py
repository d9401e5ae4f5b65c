"""Base-model metadata that A1111, Forge and kohya-aware tools read, for each family ComfyUI loads:
the version decides which checkpoints a LoRA is listed for (an ``sdxl_`` prefix, ``ss_v2``)."""
from types import SimpleNamespace

import pytest
import torch

import comfy.model_base
import comfy.supported_models as models

from loralab.adapters.metadata import base_family, training_metadata


def _patcher(config_class, model_type=comfy.model_base.ModelType.EPS):
    """Only the config's class and the model type matter to the family."""
    return SimpleNamespace(model=SimpleNamespace(model_config=config_class.__new__(config_class), model_type=model_type))


def _metadata(patcher, resolutions=((512, 768), (640, 640))):
    return training_metadata(algorithm="lora", rank=4, alpha=4.0, steps=10, learning_rate=1e-4,
                             base_model=type(patcher.model.model_config).__name__, resolutions=list(resolutions),
                             dataset_size=3, optimizer="AdamW", loss_function="MSE", batch_size=1, seed=0,
                             training_dtype=torch.float32, target_layers="attention", family=base_family(patcher))


def _a1111_version(metadata):
    """How A1111 files a LoRA under a model version, from its metadata alone."""
    if metadata.get("ss_base_model_version", "").startswith("sdxl_"):
        return "SDXL"
    return "SD2" if metadata.get("ss_v2") == "True" else "SD1"


@pytest.mark.parametrize("config_class,model_type,version,architecture,listed_as", [
    (models.SD15, comfy.model_base.ModelType.EPS, "sd_v1", "stable-diffusion-v1/lora", "SD1"),
    (models.SD20, comfy.model_base.ModelType.EPS, "sd_v2", "stable-diffusion-v2-512/lora", "SD2"),
    (models.SD20, comfy.model_base.ModelType.V_PREDICTION, "sd_v2_v", "stable-diffusion-v2-768-v/lora", "SD2"),
    (models.SD21UnclipL, comfy.model_base.ModelType.V_PREDICTION, "sd_v2_v", "stable-diffusion-v2-768-v/lora", "SD2"),
    (models.SDXL, comfy.model_base.ModelType.EPS, "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "SDXL"),
    (models.SSD1B, comfy.model_base.ModelType.EPS, "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "SDXL"),
    (models.SDXLRefiner, comfy.model_base.ModelType.EPS, "sdxl_refiner_v1-0", "stable-diffusion-xl-v1-refiner/lora",
     "SDXL"),
    (models.SD3, comfy.model_base.ModelType.FLOW, "sd3", "stable-diffusion-3/lora", "SD1"),
    (models.Flux, comfy.model_base.ModelType.FLUX, "flux1", "flux-1-dev/lora", "SD1"),
    (models.FluxSchnell, comfy.model_base.ModelType.FLUX, "flux1", "flux-1-schnell/lora", "SD1"),
])
def test_each_family_is_named_as_kohya_names_it(config_class, model_type, version, architecture, listed_as):
    metadata = _metadata(_patcher(config_class, model_type))
    assert metadata["ss_base_model_version"] == version
    assert metadata["modelspec.architecture"] == architecture
    assert _a1111_version(metadata) == listed_as
    assert metadata["loralab_base_model"] == config_class.__name__


def test_resolution_is_the_largest_bucket_in_modelspec_form():
    metadata = _metadata(_patcher(models.SD15))
    assert metadata["modelspec.resolution"] == "640x640" and metadata["ss_resolution"] == "(640, 640)"
    assert all(isinstance(v, str) for v in metadata.values())
