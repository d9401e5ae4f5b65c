"""Bad inputs give errors that name the input and say what to do; the server keeps serving."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from devkit.comfy_host import execution_error

from server_graphs import training_prompt


def _image(path, size=(64, 64), color=(200, 30, 30)):
    Image.fromarray(np.full((size[1], size[0], 3), color, dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def folders(comfy_base):
    root = comfy_base / "input"
    (root / "empty_set").mkdir()
    (root / "empty_set" / "notes.txt").write_text("no images here")
    (root / "broken_set").mkdir()
    _image(root / "broken_set" / "good.png")
    (root / "broken_set" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (root / "mixed_set").mkdir()
    _image(root / "mixed_set" / "a.png", (64, 64))
    _image(root / "mixed_set" / "b.png", (48, 64))
    for name, count in (("three_set", 3), ("two_set", 2)):
        (root / name).mkdir()
        for i in range(count):
            _image(root / name / f"{i}.png", color=(40 * i, 90, 200))
    return root


def _error(server, prompt) -> dict:
    entry = server.run_prompt(prompt)
    error = execution_error(entry)
    assert error is not None, "the prompt should have failed"
    return error


def test_empty_folder_names_folder_and_accepted_types(server, folders):
    error = _error(server, training_prompt("empty_set"))
    assert error["node_type"] == "LoraLab_LoadImageSet"
    assert "empty_set" in error["exception_message"] and ".png" in error["exception_message"]


def test_unreadable_image_names_the_file(server, folders):
    error = _error(server, training_prompt("broken_set"))
    assert "broken.png" in error["exception_message"]


def test_mixed_sizes_without_resize_or_bucketing(server, folders):
    error = _error(server, training_prompt("mixed_set", resize_method="None"))
    message = error["exception_message"]
    assert "resize_method" in message and "bucketing" in message and "48x64" in message


def test_positive_count_mismatch_names_both_counts(server, folders):
    error = _error(server, training_prompt("three_set", caption_folder="two_set"))
    assert error["node_type"] == "LoraLab_TrainLora"
    assert "positive has 2" in error["exception_message"] and "latents has 3" in error["exception_message"]


def test_prefix_outside_output_is_refused_and_nothing_is_written(server, folders, comfy_base):
    before = {p for p in comfy_base.rglob("*escape*")}
    error = _error(server, training_prompt("two_set", prefix="../../escape_attempt"))
    assert error["node_type"] == "LoraLab_SaveLoRA" and "prefix" in error["exception_message"]
    assert {p for p in comfy_base.parent.rglob("*escape_attempt*")} == before


def test_server_runs_the_next_prompt_after_errors(server, folders, comfy_base):
    _error(server, training_prompt("empty_set"))
    entry = server.run_prompt(training_prompt("two_set", steps=2, prefix="loras/after_errors"))
    assert execution_error(entry) is None
    assert server.is_alive()
    assert list((comfy_base / "output" / "loras").glob("after_errors_2_steps_00001_.safetensors"))
