"""Every template in example_workflows/ has a thumbnail, is listed and served by ComfyUI's template
endpoints, converts against the live /object_info with no unknown node types, and runs as-is on
the tiny model to completion, producing what it promises."""
from __future__ import annotations

import io
import json
import urllib.request

import numpy as np
import pytest
import safetensors
from PIL import Image

from devkit.comfy_events import run_and_watch
from devkit.comfy_host import PACK_DIR, PACK_LINK_NAME
from devkit.example_lora import EXAMPLE_LORA_FILENAME
from devkit.workflow_api import FRONTEND_ONLY, _has_control_widget, _is_widget, _ordered_inputs, nodes_of_type, ui_to_api

TEMPLATE_DIR = PACK_DIR / "example_workflows"
TEMPLATES = sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))


def _workflow(name: str) -> dict:
    return json.loads((TEMPLATE_DIR / f"{name}.json").read_text())


def _get(server, path: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(server.url + path, timeout=30) as r:
        return r.headers.get("Content-Type", ""), r.read()


def test_the_four_templates_exist():
    assert set(TEMPLATES) >= {"loralab_basic_lora", "loralab_continue_training", "loralab_lokr_previews",
                              "loralab_compare_base_and_lora"}


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_has_a_jpeg_thumbnail(name):
    with Image.open(TEMPLATE_DIR / f"{name}.jpg") as im:
        assert im.format == "JPEG"
        assert im.width >= 256 and im.height >= 256
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    assert pixels.std() > 10, "the thumbnail is blank"


def test_templates_are_listed_and_served_with_thumbnails(server):
    listed = server.get_json("/workflow_templates")
    assert sorted(listed.get(PACK_LINK_NAME, [])) == TEMPLATES
    for name in TEMPLATES:
        # the URLs the frontend's template browser builds for a custom node's template
        _, body = _get(server, f"/api/workflow_templates/{PACK_LINK_NAME}/{name}.json")
        assert json.loads(body) == _workflow(name)
        kind, body = _get(server, f"/api/workflow_templates/{PACK_LINK_NAME}/{name}.jpg")
        assert kind == "image/jpeg"
        with Image.open(io.BytesIO(body)) as im:
            assert im.format == "JPEG"


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_converts_with_every_widget_value_in_place(name, object_info):
    """No unknown node types, and each node stores exactly one value per widget, so the positional
    widget values land on the inputs they were written for."""
    workflow = _workflow(name)
    prompt = ui_to_api(workflow, object_info)
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            assert node["widgets_values"] and node["widgets_values"][0].strip(), "empty note"
            continue
        widgets = [(n, s) for n, s in _ordered_inputs(object_info[node["type"]]) if _is_widget(s)]
        assert len(node["widgets_values"]) == sum(1 + _has_control_widget(n, s) for n, s in widgets), node["type"]
        inputs = prompt[str(node["id"])]["inputs"]
        for input_name, spec in widgets:
            options = spec[0] if isinstance(spec[0], list) else (spec[1] if len(spec) > 1 else {}).get("options")
            if options and input_name not in ("ckpt_name", "existing_lora", "folder") \
                    and not isinstance(inputs[input_name], list):
                assert inputs[input_name] in options, (node["type"], input_name, inputs[input_name])
    links = {link[0] for link in workflow["links"]}
    for node in workflow["nodes"]:
        for socket in node["inputs"]:
            assert socket["link"] is None or socket["link"] in links
    assert nodes_of_type(prompt, "LoraLab_TrainLora") and nodes_of_type(prompt, "LoraLab_SaveLoRA")


@pytest.fixture(scope="module")
def runs(server, object_info, comfy_base):
    """Runs a template once, as the browser queues it; the outputs it made are removed afterwards
    so other tests see an output folder without them."""
    output = comfy_base / "output"
    before = {p for p in output.rglob("*") if p.is_file()}
    done: dict[str, dict] = {}

    def run(name: str) -> dict:
        if name not in done:
            prompt = ui_to_api(_workflow(name), object_info)
            log_start = len(server.log_text())
            events = run_and_watch(server, prompt, timeout=1800)
            prompt_id = events[-1]["data"]["prompt_id"]
            entry = server.wait_for(prompt_id)  # history is written just after the websocket says done
            done[name] = {"events": events, "prompt": prompt, "entry": entry, "output": output,
                          "log": server.log_text()[log_start:]}
        return done[name]

    yield run
    for path in {p for p in output.rglob("*") if p.is_file()} - before:
        path.unlink()


def _files(run: dict, class_type: str, key: str) -> list:
    entry, prompt = run["entry"], run["prompt"]
    return [run["output"] / item.get("subfolder", "") / item["filename"]
            for nid in nodes_of_type(prompt, class_type) for item in entry["outputs"].get(nid, {}).get(key, [])]


def _metadata(path) -> tuple[dict, list[str]]:
    with safetensors.safe_open(str(path), "pt") as f:
        return f.metadata(), list(f.keys())


def _template_steps(run: dict) -> int:
    (train,) = nodes_of_type(run["prompt"], "LoraLab_TrainLora")
    return run["prompt"][train]["inputs"]["steps"]


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_runs_to_completion_and_saves_its_outputs(name, runs):
    run = runs(name)
    kinds = [e["type"] for e in run["events"]]
    errors = [(e["data"].get("node_type"), e["data"].get("exception_message")) for e in run["events"]
              if e["type"] == "execution_error"]
    assert kinds[-1] == "execution_success", errors
    assert "execution_error" not in kinds
    # every output node of the template ran and reported what it saved
    (lora,) = _files(run, "LoraLab_SaveLoRA", "lora_files")
    assert lora.is_file() and lora.with_suffix(".trainstate").is_file()
    assert lora.parent == run["output"] / "loras"
    (graph,) = _files(run, "LoraLab_LossGraph", "images")
    losses = [v for nid in nodes_of_type(run["prompt"], "LoraLab_LossGraph") for v in run["entry"]["outputs"][nid]["loss"]]
    assert len(losses) == _template_steps(run)
    with Image.open(graph) as im:
        assert im.format == "PNG"
    for path in _files(run, "SaveImage", "images"):
        with Image.open(path) as im:
            assert im.format == "PNG"


def test_continue_template_goes_on_from_the_example_lora_and_its_state(runs, comfy_base):
    run = runs("loralab_continue_training")
    (lora,) = _files(run, "LoraLab_SaveLoRA", "lora_files")
    example = comfy_base / "models" / "loras" / EXAMPLE_LORA_FILENAME
    example_meta, example_keys = _metadata(example)
    meta, keys = _metadata(lora)
    total = int(example_meta["ss_steps"]) + _template_steps(run)
    assert meta["ss_steps"] == str(total)
    assert lora.name.startswith(f"loralab_continued_{total}_steps_")
    assert sorted(keys) == sorted(example_keys)  # the same layers, rank and algorithm as the file
    assert meta["ss_network_dim"] == example_meta["ss_network_dim"]
    assert f"restored optimizer state, RNG and data order of '{EXAMPLE_LORA_FILENAME}'" in run["log"]
    # the note promises the same LoRA as one run of all the steps: the file's steps were trained in
    # the dtype the template's steps train in (the node's defaults, resolved on this machine)
    assert meta["ss_mixed_precision"] == example_meta["ss_mixed_precision"]


def test_lokr_template_trains_lokr_and_saves_a_preview_every_sample_every_steps(runs):
    run = runs("loralab_lokr_previews")
    (lora,) = _files(run, "LoraLab_SaveLoRA", "lora_files")
    meta, keys = _metadata(lora)
    assert meta["loralab_algorithm"] == "lokr"
    assert any(".lokr_w1" in k for k in keys) and not any("lora_up" in k for k in keys)

    (train,) = nodes_of_type(run["prompt"], "LoraLab_TrainLora")
    inputs = run["prompt"][train]["inputs"]
    every, steps = inputs["sample_every"], inputs["steps"]
    previews = _files(run, "LoraLab_TrainLora", "images")  # what the node shows, saved under output/
    assert len(previews) == steps // every >= 2
    arrays = []
    for step, path in zip(range(every, steps + 1, every), previews):
        assert f"{step:05d}" in path.name and path.is_file()
        with Image.open(path) as im:
            assert im.size == (inputs["sample_width"], inputs["sample_height"])
            arrays.append(np.asarray(im.convert("RGB"), dtype=np.float32))
    # same seed and prompt every time: only the training in between changes the picture
    assert all(np.abs(a - b).mean() > 0 for a, b in zip(arrays, arrays[1:]))


def test_compare_template_saves_base_and_lora_side_by_side(runs):
    run = runs("loralab_compare_base_and_lora")
    (pair,) = _files(run, "SaveImage", "images")
    with Image.open(pair) as im:
        assert im.width == 2 * im.height
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    half = pixels.shape[1] // 2
    base, with_lora = pixels[:, :half], pixels[:, half:]
    assert base.std() > 1 and with_lora.std() > 1, "an empty half"
    assert np.abs(base - with_lora).mean() > 1.0, "the LoRA changed nothing visible"
