"""Saved files against ComfyUI's own LoRA loader, in-process: weights at strength 1 and 0.5,
round trips, and continuing from files of other trainers."""
from __future__ import annotations

import json

import pytest
import torch

import comfy.model_management
import comfy.sd
import comfy.utils

from loralab.adapters.files import load_adapter_file, save_adapter_file
from loralab.adapters.keys import to_key_style
from loralab.adapters.registry import ALGORITHMS
from loralab.sampler.lora_training import (ExistingAdapter, LoraTrainingRequest, load_existing, release_patcher,
                                           train_lora)
from loralab.sampler.train_sampler import TrainConfig

LINEAR_IN_STRENGTH = {"lora", "loha", "lokr", "glora"}


def _train(model, latents, positive, algorithm="lora", steps=1, existing=None, checkpointing=False, **kw):
    request = LoraTrainingRequest(config=TrainConfig(steps=steps, learning_rate=0.01, seed=3), algorithm=algorithm,
                                  rank=4, alpha=4.0, training_dtype="fp32", gradient_checkpointing=checkpointing,
                                  existing=existing, **kw)
    return train_lora(model, latents[:2], positive[:2], request)


def _patched_weights(model, sd, strength, names):
    patched, _ = comfy.sd.load_lora_for_models(model, None, sd, strength, 0)
    comfy.model_management.load_models_gpu([patched], force_full_load=True)
    dm = patched.model.diffusion_model
    weights = {n: dm.get_submodule(n).weight.detach().clone() for n in names}
    release_patcher(patched)
    return weights


# DoRA first: its bug with checkpointed recompute only showed in the first checkpointed run of a process
@pytest.mark.parametrize("algorithm", ["dora"] + sorted(set(ALGORITHMS) - {"dora"}))
def test_builtin_loader_weights_match_ours_at_full_and_half_strength(sd15, motif_training_inputs, tmp_path, algorithm):
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    result = _train(model, latents, positive, algorithm, steps=2, checkpointing=True)  # recompute must match too
    path = tmp_path / "a.safetensors"
    save_adapter_file(path, to_key_style(dict(result.lora), "kohya", result.lora.kohya_names), result.lora.metadata)
    sd = comfy.utils.load_torch_file(str(path))
    names = result.network.names[:6] + result.network.names[-3:]
    dm = model.model.diffusion_model
    base = {n: dm.get_submodule(n).weight.detach().clone() for n in names}
    adapters = dict(result.network.items())
    full = _patched_weights(model, sd, 1.0, names)
    half = _patched_weights(model, sd, 0.5, names)
    for n in names:
        with torch.no_grad():
            torch.testing.assert_close(full[n], adapters[n].merged_weight(base[n], 1.0), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(half[n], adapters[n].merged_weight(base[n], 0.5), rtol=1e-5, atol=1e-6)
        assert not torch.equal(full[n], base[n])
        if algorithm in LINEAR_IN_STRENGTH:
            torch.testing.assert_close(half[n] - base[n], 0.5 * (full[n] - base[n]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("style", ["kohya", "comfyui"])
def test_save_load_save_round_trip_is_identical(sd15, motif_training_inputs, tmp_path, style):
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    first = _train(model, latents, positive, "lokr", steps=1)
    a = tmp_path / "a.safetensors"
    save_adapter_file(a, to_key_style(dict(first.lora), style, first.lora.kohya_names), first.lora.metadata)
    tensors, metadata = load_adapter_file(a)
    loaded = load_existing(model.model, ExistingAdapter(tensors, metadata), dtype=torch.float32, device="cpu")
    b = tmp_path / "b.safetensors"
    save_adapter_file(b, to_key_style(loaded.to_state_dict(), style, first.lora.kohya_names), metadata)
    t1, m1 = load_adapter_file(a)
    t2, m2 = load_adapter_file(b)
    assert m1 == m2 and t1.keys() == t2.keys()
    for k in t1:
        assert torch.equal(t1[k], t2[k]), k
    # the widgets (another algorithm, preset and options) are ignored when continuing: the file decides
    again = _train(model, latents, positive, "lora", existing=ExistingAdapter(tensors, metadata),
                   target_layers="attention", algorithm_options={"dora": True})
    assert again.total_steps == 2  # steps come from the file's metadata
    assert again.network.algorithm == "lokr"
    assert json.loads(again.lora.metadata["ss_network_args"]) == json.loads(metadata["ss_network_args"])
    assert json.loads(metadata["ss_network_args"])["algo"] == "lokr"
    assert again.lora.metadata["loralab_target_layers"] == metadata["loralab_target_layers"] != "attention"


def test_continue_from_other_trainers_files(sd15, motif_training_inputs):
    """A kohya-style file from another trainer (no LoRA Lab metadata) and a file in the layout of
    ComfyUI's native trainer (diffusion_model.* keys plus .diff/.diff_b) both continue."""
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    ours = _train(model, latents, positive, "lora", train_norm_bias=True)
    native_like = dict(ours.lora)  # comfy keys with .diff/.diff_b, no metadata, like the native trainer
    assert any(k.endswith(".diff_b") for k in native_like) and any(k.endswith(".diff") for k in native_like)
    cont = _train(model, latents, positive, "loha", existing=ExistingAdapter(native_like, {}))
    assert cont.network.algorithm == "lora" and len(cont.network.offsets) == len(ours.network.offsets)
    assert cont.total_steps == 1  # no metadata: nothing known about earlier steps
    # our own kohya-style file with norm offsets (saved under the norms' diffusers names) reads back whole
    kohya_offsets = to_key_style(dict(ours.lora), "kohya", ours.lora.kohya_names)
    assert any(k.startswith("lora_unet_") and "norm" in k and k.endswith(".diff") for k in kohya_offsets)
    loaded = load_existing(model.model, ExistingAdapter(kohya_offsets, {}), dtype=torch.float32, device="cpu")
    back = loaded.to_state_dict()
    assert back.keys() == ours.lora.keys() and all(torch.equal(back[k], ours.lora[k]) for k in back)
    plain = _train(model, latents, positive, "lora")
    kohya = to_key_style(dict(plain.lora), "kohya", plain.lora.kohya_names)
    cont = _train(model, latents, positive, existing=ExistingAdapter(kohya, {"ss_steps": "250"}))
    assert cont.total_steps == 251 and len(cont.network) == len(plain.network)


def test_file_for_another_architecture_lists_unmatched_keys(sd15, motif_training_inputs):
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    foreign = {"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9, 4),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 3)}
    with pytest.raises(ValueError, match="lora_unet_double_blocks_0_img_attn_qkv"):
        _train(model, latents, positive, existing=ExistingAdapter(foreign, {}, name="flux_lora.safetensors"))


def test_continue_from_a_file_of_comfyuis_native_trainer(sd15, motif_training_inputs):
    """ComfyUI's own TrainLoraNode trains one step; its LORA_MODEL (all biases and norms too) continues here."""
    from comfy_extras.nodes_train import TrainLoraNode
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    out = TrainLoraNode.execute(
        model=[model], latents=latents[:2], positive=positive[:2], batch_size=[1], steps=[1],
        grad_accumulation_steps=[1], learning_rate=[0.001], rank=[4], optimizer=["AdamW"], loss_function=["MSE"],
        seed=[0], training_dtype=["fp32"], lora_dtype=["fp32"], algorithm=["LoRA"], gradient_checkpointing=[False],
        existing_lora=["[None]"])
    native = {k: v.detach().clone() for k, v in out.args[1].items()}
    assert any(k.endswith(".diff_b") for k in native) and any(k.endswith(".lora_up.weight") for k in native)
    cont = _train(model, latents, positive, existing=ExistingAdapter(native, {}, name="native.safetensors"))
    lora_layers = {k.rsplit(".lora_up.weight", 1)[0] for k in native if k.endswith(".lora_up.weight")}
    assert len(cont.network) == len(lora_layers)
    assert len(cont.network.offsets) == sum(k.endswith((".diff", ".diff_b")) for k in native)


def _text_encoder_lora(clip, rank=2) -> dict[str, torch.Tensor]:
    """kohya-style LoRA tensors for the first text-encoder layer's q_proj of ``clip``."""
    key = next(k for k in clip.cond_stage_model.state_dict() if k.endswith("layers.0.self_attn.q_proj.weight"))
    out_features, in_features = clip.cond_stage_model.state_dict()[key].shape
    g = torch.Generator().manual_seed(9)
    base = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    return {f"{base}.lora_down.weight": torch.randn(rank, in_features, generator=g),
            f"{base}.lora_up.weight": torch.randn(out_features, rank, generator=g), f"{base}.alpha": torch.tensor(2.0)}


def test_a_kohya_file_with_text_encoder_layers_continues_and_keeps_them(sd15, motif_training_inputs, tmp_path,
                                                                        caplog):
    """kohya trains the text encoder by default; continuing such a file trains its diffusion-model
    layers and carries the text-encoder layers, unchanged, into the saved file."""
    model, clip, _ = sd15
    latents, positive = motif_training_inputs
    first = _train(model, latents, positive)
    text_encoder = _text_encoder_lora(clip)
    kohya = {**to_key_style(dict(first.lora), "kohya", first.lora.kohya_names), **text_encoder}
    with caplog.at_level("INFO", logger="loralab"):
        again = _train(model, latents, positive, existing=ExistingAdapter(kohya, first.lora.metadata, None, "k"))
    assert "keeping the 3 text-encoder tensors" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        saved = to_key_style(dict(again.lora), "kohya", again.lora.kohya_names)
        assert all(torch.equal(saved[k], v) for k, v in text_encoder.items())
        assert any(not torch.equal(saved[k], kohya[k]) for k in kohya if k.startswith("lora_unet_"))  # trained on
        path = tmp_path / "with_te.safetensors"
        save_adapter_file(path, saved, again.lora.metadata)
        patched_model, patched_clip = comfy.sd.load_lora_for_models(model, clip, comfy.utils.load_torch_file(str(path)),
                                                                    1.0, 1.0)
    assert "lora key not loaded" not in caplog.text  # every key, the text encoder's too, maps in ComfyUI
    assert len(patched_clip.patcher.patches) == 1


def test_continuing_reports_the_inputs_the_file_overrides(sd15, motif_training_inputs, caplog):
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    first = _train(model, latents, positive)  # LoRA, rank 4, alpha 4
    with caplog.at_level("WARNING", logger="loralab"):
        _train(model, latents, positive, existing=ExistingAdapter(dict(first.lora), first.lora.metadata, None, "f"))
    assert "are ignored" not in caplog.text  # the same settings: nothing to report
    request = LoraTrainingRequest(config=TrainConfig(steps=1, learning_rate=0.01), algorithm="loha", rank=16,
                                  alpha=4.0, training_dtype="fp32", gradient_checkpointing=False,
                                  existing=ExistingAdapter(dict(first.lora), first.lora.metadata, None, "f"))
    with caplog.at_level("WARNING", logger="loralab"):
        again = train_lora(model, latents[:2], positive[:2], request)
    assert again.network.algorithm == "lora" and again.network.rank == 4
    assert "algorithm loha (the file's: lora)" in caplog.text and "rank 16 (the file's: 4)" in caplog.text


def test_a_non_safetensors_existing_lora_is_refused_by_name(tmp_path, monkeypatch):
    """ComfyUI lists .pt/.ckpt LoRAs too, so they can be picked as existing_lora."""
    import folder_paths
    from loralab.nodes_train import _load_existing
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, tmp_path / "old.pt")
    paths, extensions = folder_paths.folder_names_and_paths["loras"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([*paths, str(tmp_path)], extensions))
    with pytest.raises(ValueError, match="existing_lora 'old.pt' is not a .safetensors file"):
        _load_existing("old.pt")


def test_damaged_existing_files_fail_or_fall_back_clearly(sd15, motif_training_inputs, tmp_path, monkeypatch, caplog):
    """A damaged LoRA file is an error naming existing_lora; a damaged .trainstate beside a good file
    only loses the exact resume (a warning), as a missing one does."""
    import folder_paths
    from loralab.nodes_train import _load_existing
    from loralab.sampler import train_state
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    paths, extensions = folder_paths.folder_names_and_paths["loras"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([*paths, str(tmp_path)], extensions))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="existing_lora 'empty.safetensors' cannot be read"):
        _load_existing("empty.safetensors")

    good = _train(model, latents, positive)
    save_adapter_file(tmp_path / "good.safetensors", dict(good.lora), good.lora.metadata)
    train_state.state_path_for(tmp_path / "good.safetensors").write_bytes(b"\x00" * 16)
    with caplog.at_level("WARNING", logger="loralab"):
        existing = _load_existing("good.safetensors")
    assert existing.train_state is None and "good.trainstate' cannot be read" in caplog.text
    assert _train(model, latents, positive, existing=existing).total_steps == 2


def test_a_diverged_existing_lora_is_refused(sd15, motif_training_inputs):
    model, _, _ = sd15
    latents, positive = motif_training_inputs
    tensors = dict(_train(model, latents, positive).lora)
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    with pytest.raises(ValueError, match="holds NaN or infinite values in 1 tensors"):
        _train(model, latents, positive, existing=ExistingAdapter(tensors, {}, None, "nan"))
