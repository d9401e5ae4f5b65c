"""The pack inside a real ComfyUI server, driven over HTTP like the browser drives it."""
from __future__ import annotations

import shutil

import pytest
import safetensors
import safetensors.torch
from PIL import Image

from devkit.comfy_host import execution_error
from devkit.workflow_api import nodes_of_type

from server_graphs import load_prediction, CKPT, node, prediction_nodes, template_prompt, text_nodes

SEED_INPUTS = {
    "LoraLab_TrainLora": ["model", "latents", "positive", "batch_size", "grad_accumulation_steps", "steps",
                          "learning_rate", "rank", "optimizer", "loss_function", "seed", "training_dtype",
                          "lora_dtype", "algorithm", "gradient_checkpointing", "existing_lora"],
    "LoraLab_SaveLoRA": ["lora", "prefix", "steps"],
    "LoraLab_LoadLoraModel": ["model", "lora", "strength_model"],
    "LoraLab_LossGraph": ["loss", "filename_prefix"],
    "LoraLab_LoadImageSet": ["folder", "resize_method", "width", "height", "default_caption"],
    "LoraLab_ImageSetFromImages": ["images", "captions", "resize_method", "width", "height"],
}


def _inputs(info: dict) -> set[str]:
    return set(info["input"].get("required", {})) | set(info["input"].get("optional", {}))


def test_pack_imports_without_errors(server):
    log = server.log_text()
    loaded = [line for line in log.splitlines() if line.rstrip().endswith("custom_nodes/lora-lab")]
    assert loaded, "the pack was not loaded from custom_nodes/"
    assert not [line for line in loaded if "IMPORT FAILED" in line], loaded
    assert not [line for line in log.splitlines() if "Cannot import" in line and "custom_nodes/lora-lab" in line]


def test_object_info_lists_every_node_with_its_inputs(object_info):
    for node_id, names in SEED_INPUTS.items():
        assert node_id in object_info, f"{node_id} missing from /object_info"
        assert set(names) <= _inputs(object_info[node_id]), node_id
        assert object_info[node_id]["category"] == "LoRA Lab"
    train = object_info["LoraLab_TrainLora"]
    assert train["output"] == ["MODEL", "LORA_MODEL", "LOSS_MAP", "INT"]
    assert set(train["input"]["required"]["algorithm"][1]["options"]) == {"LoRA", "DoRA", "LoHa", "LoKr", "OFT", "BOFT", "GLoRA"}
    assert object_info["LoraLab_LoadLoraModel"]["input"]["required"]["strength_model"][1]["min"] == -100.0


@pytest.fixture(scope="module")
def template_run(server, object_info, comfy_base):
    """The template graph, plus predictions from TrainLora's model and from the base model."""
    steps = 8
    prompt = template_prompt(object_info, steps=steps, training_dtype="fp32", learning_rate=0.002, alpha=8.0)
    (train,) = nodes_of_type(prompt, "LoraLab_TrainLora")
    (ckpt,) = nodes_of_type(prompt, "CheckpointLoaderSimple")
    texts, pos, neg = text_nodes([ckpt, 1], 200)
    prompt.update(texts)
    prompt.update(prediction_nodes([train, 0], pos, neg, "pred/trained", 210))
    prompt.update(prediction_nodes([ckpt, 0], pos, neg, "pred/base", 220))
    (applied,) = nodes_of_type(prompt, "LoraLab_LoadLoraModel")
    prompt.update(prediction_nodes([applied, 0], pos, neg, "pred/applied", 230))
    entry = server.run_prompt(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    return {"entry": entry, "prompt": prompt, "steps": steps, "out": comfy_base / "output"}


def test_template_saves_lora_with_training_metadata(template_run):
    files = sorted((template_run["out"] / "loras").glob("loralab_demo_*_steps_*_.safetensors"))
    assert [f.name for f in files] == ["loralab_demo_8_steps_00001_.safetensors"]
    with safetensors.safe_open(str(files[0]), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_steps"] == "8" and meta["ss_network_dim"] == "8" and meta["loralab_algorithm"] == "lora"
    assert float(meta["ss_network_alpha"]) == 8.0 and float(meta["ss_learning_rate"]) == 0.002
    assert meta["ss_num_train_images"] == "8" and meta["ss_resolution"] == "(128, 128)"
    assert meta["loralab_base_model"] == "SD15"
    assert any(k.endswith(".lora_up.weight") for k in keys)
    assert not list((template_run["out"] / "loras").glob(".*tmp"))  # no temp file left behind


def test_loss_map_has_one_entry_per_step_and_graph_png_exists(template_run):
    entry, prompt = template_run["entry"], template_run["prompt"]
    (graph,) = nodes_of_type(prompt, "LoraLab_LossGraph")
    ui = entry["outputs"][graph]
    assert len(ui["loss"]) == template_run["steps"]
    image = ui["images"][0]
    png = template_run["out"] / image["subfolder"] / image["filename"]
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width >= 400


def test_builtin_lora_loader_reproduces_trained_model(server, template_run, comfy_base):
    """ComfyUI's own LoraLoaderModelOnly on the saved file predicts what TrainLora's model predicts."""
    (saved,) = (template_run["out"] / "loras").glob("loralab_demo_*.safetensors")
    shutil.copy(saved, comfy_base / "models" / "loras" / saved.name)
    log_before = len(server.log_text())
    prompt = {"1": node("CheckpointLoaderSimple", ckpt_name=CKPT),
              "2": node("LoraLoaderModelOnly", model=["1", 0], lora_name=saved.name, strength_model=1.0)}
    texts, pos, neg = text_nodes(["1", 1], 10)
    prompt.update(texts)
    prompt.update(prediction_nodes(["2", 0], pos, neg, "pred/builtin", 20))
    prompt.update(prediction_nodes(["1", 0], pos, neg, "pred/base_again", 30))
    entry = server.run_prompt(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    log = server.log_text()[log_before:]
    assert "lora key not loaded" not in log

    out = template_run["out"] / "pred"
    trained, builtin = load_prediction(out / "trained_00001_.latent"), load_prediction(out / "builtin_00001_.latent")
    base, base_again = load_prediction(out / "base_00001_.latent"), load_prediction(out / "base_again_00001_.latent")
    assert (trained - base).abs().max() > 1e-2, "the LoRA changed nothing; the comparison would be vacuous"
    assert (builtin - trained).abs().max() < 1e-4
    applied = load_prediction(out / "applied_00001_.latent")  # our Apply LoRA node on the LORA_MODEL output
    assert (applied - trained).abs().max() < 1e-4
    assert (base_again - base).abs().max() == 0  # the trained adapter never leaked into the base model


def test_every_node_has_help_served_that_covers_its_inputs(server, object_info):
    import urllib.request
    for node_id, info in object_info.items():
        if not node_id.startswith("LoraLab_"):
            continue
        with urllib.request.urlopen(f"{server.url}/extensions/lora-lab/docs/{node_id}.md", timeout=10) as r:
            text = r.read().decode()
        missing = [name for name in info["input"].get("required", {}) if f"**{name}**" not in text]
        assert not missing, f"{node_id} help does not mention {missing}"
