"""Every algorithm x key style through the real server: train 2 steps, save, load the file with
ComfyUI's built-in LoraLoaderModelOnly, and compare predictions with TrainLora's own model."""
from __future__ import annotations

import shutil

import pytest
import safetensors.torch

from devkit.comfy_host import execution_error

from server_graphs import load_prediction, CKPT, node, prediction_nodes, text_nodes, training_prompt

ALGORITHMS = ["LoRA", "DoRA", "LoHa", "LoKr", "OFT", "BOFT", "GLoRA"]
STYLES = ["kohya", "comfyui"]
SIZE = 64


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_algorithm_files_load_in_builtin_loader_with_equal_predictions(server, object_info, comfy_base, algorithm):
    assert algorithm in object_info["LoraLab_TrainLora"]["input"]["required"]["algorithm"][1]["options"]
    out = comfy_base / "output"
    prompt = training_prompt("loralab_motif", steps=2, prefix=f"loras/algo_{algorithm}_kohya", algorithm=algorithm,
                             learning_rate=0.003, alpha=4.0)
    prompt["6"]["inputs"]["key_style"] = "kohya"
    prompt["7"] = node("LoraLab_SaveLoRA", lora=["5", 1], prefix=f"loras/algo_{algorithm}_comfyui", steps=["5", 3],
                       key_style="comfyui")
    texts, pos, neg = text_nodes(["1", 1], 100)
    prompt.update(texts)
    prompt.update(prediction_nodes(["5", 0], pos, neg, f"algo/{algorithm}_trained", 110, SIZE))
    prompt.update(prediction_nodes(["1", 0], pos, neg, f"algo/{algorithm}_base", 120, SIZE))
    entry = server.run_prompt(prompt)
    assert execution_error(entry) is None, execution_error(entry)

    check = {"1": node("CheckpointLoaderSimple", ckpt_name=CKPT)}
    texts, pos, neg = text_nodes(["1", 1], 10)
    check.update(texts)
    for i, style in enumerate(STYLES):
        (saved,) = (out / "loras").glob(f"algo_{algorithm}_{style}_2_steps_*.safetensors")
        with safetensors.safe_open(str(saved), "pt") as f:
            keys = list(f.keys())
            assert f.metadata()["loralab_key_style"] == style
        prefix = "lora_unet_" if style == "kohya" else "diffusion_model."
        assert keys and all(k.startswith(prefix) for k in keys), keys[:3]
        shutil.copy(saved, comfy_base / "models" / "loras" / saved.name)
        loader = str(20 + i)
        check[loader] = node("LoraLoaderModelOnly", model=["1", 0], lora_name=saved.name, strength_model=1.0)
        check.update(prediction_nodes([loader, 0], pos, neg, f"algo/{algorithm}_{style}_builtin", 30 + 10 * i, SIZE))
    log_start = len(server.log_text())
    entry = server.run_prompt(check)
    assert execution_error(entry) is None, execution_error(entry)
    assert "lora key not loaded" not in server.log_text()[log_start:]

    trained = load_prediction(out / "algo" / f"{algorithm}_trained_00001_.latent")
    base = load_prediction(out / "algo" / f"{algorithm}_base_00001_.latent")
    assert (trained - base).abs().max() > 1e-3, "training changed nothing: the comparison would be vacuous"
    for style in STYLES:
        builtin = load_prediction(out / "algo" / f"{algorithm}_{style}_builtin_00001_.latent")
        diff = (builtin - trained).abs().max()
        assert diff < 1e-4, style
