"""The dev-kit generators: the synthetic motif dataset and the tiny SD1.5 checkpoint.

The checkpoint tests load the generated file through ComfyUI's own loader, so they need a ComfyUI
checkout (``COMFYUI_PATH`` or ``$LORALAB_HOME/ComfyUI``). The checkpoint is built once per module,
in a temp folder, or, when ``LORALAB_HOME`` is set, cached in ``$LORALAB_HOME/fixtures``
(``test_checkpoint_matches_a_fresh_build`` catches a stale cache).
"""
from __future__ import annotations

import itertools
import os
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

PACK_ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(PACK_ROOT) not in sys.path:
    sys.path.insert(0, str(PACK_ROOT))

from devkit import motif_dataset, tiny_model  # noqa: E402
from devkit.motif_dataset import BACKGROUNDS, TRIGGER, make_motif_dataset  # noqa: E402


def _rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int32)


def _red_mask(px: np.ndarray) -> np.ndarray:
    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    return (r > 170) & (r - np.maximum(g, b) > 120)


def _yellow_mask(px: np.ndarray) -> np.ndarray:
    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    return (r > 200) & (g > 160) & (b < 90)


# ---------------------------------------------------------------------------------------- dataset


def test_dataset_is_byte_deterministic_and_seed_dependent(tmp_path):
    first = make_motif_dataset(tmp_path / "a", count=4, size=128, seed=3)
    second = make_motif_dataset(tmp_path / "b", count=4, size=128, seed=3)
    other_seed = make_motif_dataset(tmp_path / "c", count=4, size=128, seed=4)
    assert [p.name for p in first] == [p.name for p in second]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()
        assert a.with_suffix(".txt").read_bytes() == b.with_suffix(".txt").read_bytes()
    assert all(a.read_bytes() != c.read_bytes() for a, c in zip(first, other_seed))


def test_dataset_writes_count_images_of_size_with_captions(tmp_path):
    paths = make_motif_dataset(tmp_path, count=8, size=192, seed=0)
    assert len(paths) == 8 and sorted(tmp_path.glob("*.png")) == sorted(paths)
    captions = []
    for path in paths:
        assert Image.open(path).size == (192, 192)
        caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        background = caption.rsplit(" on a ", 1)[1].removesuffix(" background")
        assert caption.startswith(f"a photo of {TRIGGER} motif") and background in BACKGROUNDS
        captions.append(caption)
    assert len(set(captions)) >= 4, "captions should name varied backgrounds"


def test_every_image_shows_the_motif_on_a_different_background(tmp_path):
    paths = make_motif_dataset(tmp_path, count=8, size=256, seed=0)
    centroids, background_means = [], []
    for path in paths:
        px = _rgb(path)
        red, yellow = _red_mask(px), _yellow_mask(px)
        assert 0.01 < red.mean() < 0.25, f"{path.name}: red ring covers {red.mean():.3f}"
        assert 0.005 < yellow.mean() < 0.2, f"{path.name}: yellow star covers {yellow.mean():.3f}"
        ys, xs = np.nonzero(red)
        centroids.append((xs.mean(), ys.mean()))
        background_means.append(px[~(red | yellow)].mean(axis=0))
    # The motif moves around...
    assert np.ptp([c[0] for c in centroids]) > 40 and np.ptp([c[1] for c in centroids]) > 40
    # ...and no two backgrounds look alike.
    for a, b in itertools.combinations(background_means, 2):
        assert np.abs(a - b).max() > 8


def test_mixed_sizes_gives_several_aspect_ratios(tmp_path):
    paths = make_motif_dataset(tmp_path, count=6, size=256, seed=1, mixed_sizes=True)
    sizes = [Image.open(p).size for p in paths]
    assert len(set(sizes)) >= 3
    assert len({round(w / h, 2) for w, h in sizes}) >= 3
    for (w, h), path in zip(sizes, paths):
        assert w % 8 == 0 and h % 8 == 0
        assert 0.75 < (w * h) / 256**2 < 1.25
        assert _red_mask(_rgb(path)).mean() > 0.01


def test_dataset_cli(tmp_path, capsys):
    assert motif_dataset.main(["--out", str(tmp_path), "--count", "2", "--size", "64"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "motif_000.png"), str(tmp_path / "motif_001.png")]
    assert Image.open(printed[1]).size == (64, 64)


# ------------------------------------------------------------------------------------- checkpoint


@pytest.fixture(scope="module")
def comfy_modules():
    from devkit.comfy_path import add_comfyui_to_sys_path

    try:
        add_comfyui_to_sys_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    import comfy.sd
    import comfy.supported_models

    return comfy


@pytest.fixture(scope="module")
def checkpoint_path(comfy_modules, tmp_path_factory):
    if os.environ.get("LORALAB_HOME"):
        folder = pathlib.Path(os.environ["LORALAB_HOME"]) / "fixtures"
    else:
        folder = tmp_path_factory.mktemp("tiny_sd15")
    return tiny_model.ensure_tiny_sd15_checkpoint(folder)


@pytest.fixture(scope="module")
def loaded(comfy_modules, checkpoint_path):
    model, clip, vae = comfy_modules.sd.load_checkpoint_guess_config(str(checkpoint_path))[:3]
    return model, clip, vae


def _encode(clip, prompt):
    return clip.encode_from_tokens(clip.tokenize(prompt))


def _eps(model, x, sigma, cond):
    """The UNet's noise prediction (apply_model returns the denoised latent x - sigma * eps)."""
    import torch

    s = torch.tensor([sigma])
    denoised = model.model.apply_model(x, s, c_crossattn=cond)
    return (x - denoised) / sigma


def test_comfyui_detects_sd15_and_loads_all_parts(comfy_modules, loaded, checkpoint_path):
    model, clip, vae = loaded
    assert type(model.model.model_config) is comfy_modules.supported_models.SD15
    assert clip is not None and vae is not None
    unet_params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    assert 100e6 < unet_params < 115e6, unet_params
    assert 500e6 < checkpoint_path.stat().st_size < 700e6  # fp16


def test_every_stored_tensor_reaches_the_loaded_model(loaded, checkpoint_path):
    """The key layout is the one ComfyUI maps: nothing is dropped or left at its random init."""
    import torch
    from safetensors.torch import load_file

    model, clip, vae = loaded
    targets = {
        "model.diffusion_model.": ("", model.model.diffusion_model.state_dict()),
        "cond_stage_model.transformer.": ("clip_l.transformer.", clip.cond_stage_model.state_dict()),
        "first_stage_model.": ("", vae.first_stage_model.state_dict()),
    }
    stored = load_file(str(checkpoint_path))
    counts = dict.fromkeys(targets, 0)
    for key, tensor in stored.items():
        prefix = next(p for p in targets if key.startswith(p))
        new_prefix, loaded_sd = targets[prefix]
        loaded_key = new_prefix + key[len(prefix):]
        assert loaded_key in loaded_sd, key
        assert torch.equal(loaded_sd[loaded_key].to(torch.float16), tensor), key
        counts[prefix] += 1
    assert counts["model.diffusion_model."] == len(targets["model.diffusion_model."][1])
    assert counts["first_stage_model."] == len(targets["first_stage_model."][1])
    assert counts["cond_stage_model.transformer."] >= 196  # all of CLIP-L's text model


def test_unet_output_is_finite_nonzero_and_prompt_dependent(loaded):
    import torch

    model, clip, _ = loaded
    cond_a = _encode(clip, f"a photo of {TRIGGER} motif on a blue background")
    cond_b = _encode(clip, "a watercolor painting of a lighthouse")
    assert cond_a.shape == (1, 77, 768) and torch.isfinite(cond_a).all()
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for sigma in (0.3, 2.0, 14.0):
            eps_a = _eps(model, x * sigma, sigma, cond_a)
            eps_b = _eps(model, x * sigma, sigma, cond_b)
            assert torch.isfinite(eps_a).all()
            assert eps_a.abs().mean() > 0.05, "zero-initialised output layer?"
            assert (eps_a - eps_b).abs().mean() > 1e-3, "cross-attention ignores the prompt"


def test_attention_weights_get_gradients(loaded):
    """A LoRA on attention layers learns only if the loss reaches them (not through zeroed layers)."""
    import torch

    model, clip, _ = loaded
    unet = model.model.diffusion_model
    targets = {
        name: module.weight
        for name, module in unet.named_modules()
        if name.endswith(("attn1.to_q", "attn2.to_k", "attn2.to_v")) and name.startswith("input_blocks.1.")
    }
    assert len(targets) == 3
    cond = _encode(clip, f"a photo of {TRIGGER} motif")
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    try:
        for w in targets.values():
            w.requires_grad_(True)
            w.grad = None
        _eps(model, x, 1.0, cond).pow(2).mean().backward()
        for name, w in targets.items():
            assert w.grad is not None and w.grad.abs().max() > 0, name
    finally:
        for w in targets.values():
            w.requires_grad_(False)
            w.grad = None


def test_vae_encodes_dataset_image_to_sane_latents(loaded, tmp_path):
    import torch

    _, _, vae = loaded
    paths = make_motif_dataset(tmp_path, count=2, size=256, seed=0)
    pixels = torch.from_numpy(np.stack([_rgb(p) for p in paths]).astype(np.float32) / 255.0)
    with torch.no_grad():
        latents = vae.encode(pixels)
        decoded = vae.decode(latents[:1, :, :16, :16])  # a crop: the full-size decode is slow on CPU
    assert latents.shape == (2, 4, 32, 32) and torch.isfinite(latents).all()
    # Scaled by SD1.5's 0.18215 this is roughly unit std, like real SD latents.
    assert 2.0 < latents.std().item() < 12.0
    assert (latents[0] - latents[1]).abs().mean() > 0.1, "latents ignore the image"
    assert decoded.shape == (1, 128, 128, 3) and torch.isfinite(decoded).all()
    assert decoded.std() > 1e-3, "decoder output is constant"


def test_checkpoint_matches_a_fresh_build(checkpoint_path):
    """Same seed, same tensors: also catches a cached file from an older generator."""
    import torch
    from safetensors.torch import load_file

    assert tiny_model.read_stamp(checkpoint_path) == {
        "generator": tiny_model.GENERATOR_NAME,
        "version": tiny_model.GENERATOR_VERSION,
        "seed": 0,
    }
    on_disk = load_file(str(checkpoint_path))
    fresh = tiny_model.build_state_dict(seed=0)
    assert on_disk.keys() == fresh.keys()
    prefixes = {k.split(".")[0] for k in fresh}
    assert prefixes == {"model", "cond_stage_model", "first_stage_model"}
    for key, tensor in fresh.items():
        assert tensor.dtype == torch.float16
        assert torch.equal(on_disk[key], tensor), key


def test_ensure_rebuilds_only_when_missing_or_stale(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    calls = []

    def fake_build(path, seed=0):
        calls.append(seed)
        save_file({"x": torch.zeros(1)}, str(path), metadata=tiny_model._metadata(seed))
        return path

    monkeypatch.setattr(tiny_model, "build_tiny_sd15_checkpoint", fake_build)
    path = tiny_model.ensure_tiny_sd15_checkpoint(tmp_path, seed=0)
    assert path == tmp_path / tiny_model.CHECKPOINT_FILENAME and calls == [0]
    tiny_model.ensure_tiny_sd15_checkpoint(tmp_path, seed=0)
    assert calls == [0], "an up-to-date file must not be rebuilt"
    tiny_model.ensure_tiny_sd15_checkpoint(tmp_path, seed=5)
    assert calls == [0, 5], "another seed must rebuild"
    monkeypatch.setattr(tiny_model, "GENERATOR_VERSION", "old")
    tiny_model.ensure_tiny_sd15_checkpoint(tmp_path, seed=5)
    assert calls == [0, 5, 5], "another generator version must rebuild"
    path.write_bytes(b"not a safetensors file")
    tiny_model.ensure_tiny_sd15_checkpoint(tmp_path, seed=5)
    assert calls == [0, 5, 5, 5], "an unreadable file must be rebuilt"


def test_atomic_write_leaves_no_temp_files(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(tiny_model, "build_state_dict", lambda seed=0: {"x": torch.ones(2, dtype=torch.float16)})
    target = tmp_path / "sub" / "m.safetensors"
    assert tiny_model.build_tiny_sd15_checkpoint(target, seed=0) == target
    assert [p.name for p in target.parent.iterdir()] == ["m.safetensors"]

    def half_written(tensors, filename, metadata=None):
        pathlib.Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", half_written)
    with pytest.raises(OSError):
        tiny_model.build_tiny_sd15_checkpoint(target, seed=1)
    assert [p.name for p in target.parent.iterdir()] == ["m.safetensors"]
    assert tiny_model.read_stamp(target)["seed"] == 0, "the previous file must survive a failed write"


def test_checkpoint_cli_prints_the_path(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(tiny_model, "build_state_dict", lambda seed=0: {"x": torch.ones(2, dtype=torch.float16)})
    assert tiny_model.main(["--out", str(tmp_path), "--seed", "2"]) == 0
    expected = tmp_path / tiny_model.CHECKPOINT_FILENAME
    assert capsys.readouterr().out.strip() == str(expected)
    assert tiny_model.read_stamp(expected)["seed"] == 2
