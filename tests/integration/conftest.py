"""Fixtures for tests against a real ComfyUI: the generated tiny SD1.5 checkpoint and motif
dataset, a server started like users start it, and the same model loaded in-process."""
from __future__ import annotations

import pytest
import torch

from devkit.comfy_host import ComfyServer, make_base_directory
from devkit.fixtures import DATASET_NAME, install_example_lora, motif_dataset, tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt():
    return tiny_checkpoint()


@pytest.fixture(scope="session")
def motif_dir():
    return motif_dataset()


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory, tiny_ckpt, motif_dir):
    base = make_base_directory(tmp_path_factory.mktemp("comfy_base"), [tiny_ckpt], {DATASET_NAME: motif_dir})
    install_example_lora(base)  # models/loras/loralab_tiny_sd15_example.safetensors, for the templates
    return base


@pytest.fixture(scope="session")
def server(comfy_base):
    srv = ComfyServer(comfy_base)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def object_info(server):
    return server.get_json("/object_info")


@pytest.fixture(scope="session")
def sd15(tiny_ckpt):
    """(model patcher, clip, vae) of the tiny checkpoint, loaded in this process by ComfyUI."""
    import comfy.sd
    from loralab.sampler.lora_training import freeze
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_ckpt), output_vae=True, output_clip=True)
    freeze(model.model)  # as training does; tests that run backward themselves need it too
    return model, clip, vae


@pytest.fixture(scope="session")
def motif_training_inputs(sd15, motif_dir):
    """Latents (one LATENT per image) and positive conditionings of the motif set, as the graph makes them."""
    from loralab.dataset import load_image_set
    _, clip, vae = sd15
    image_set = load_image_set(motif_dir, "Crop", 128, 128)
    with torch.inference_mode():
        latents = [{"samples": vae.encode(img[None])} for img in image_set.images]
        positive = [clip.encode_from_tokens_scheduled(clip.tokenize(c)) for c in image_set.captions]
    return latents, positive
