"""Preview file names: each run takes its own number from ComfyUI's SaveImage counter, so runs that
share a prefix (every run of the Train LoRA node does) never overwrite each other's previews."""
from __future__ import annotations

import os

import pytest
import torch

import folder_paths

from loralab.sampler import previews
from loralab.sampler.previews import RunPreviews, preview_name, save_png
from loralab.sampler.run_outputs import SampleSettings


def _settings(prefix="loralab_samples/sample", every=2):
    return SampleSettings(every=every, positive=[], vae=None, width=64, height=64, steps=1, prefix=prefix)


def _image(value: float) -> torch.Tensor:
    return torch.full((1, 8, 8, 3), value)


@pytest.fixture
def fake_render(monkeypatch):
    """render without a model: each run paints its own grey, so files tell which run wrote them."""
    colour = {"value": 0.25}
    monkeypatch.setattr(previews, "render", lambda patcher, settings: _image(colour["value"]))
    return colour


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_the_name_puts_the_run_number_where_comfyuis_counter_reads_it():
    assert preview_name("sample", 3, 40) == "sample_00003_step00040.png"


def test_a_second_run_keeps_the_first_runs_previews(tmp_path, fake_render):
    first = RunPreviews(_settings(), str(tmp_path))
    for step in (2, 4):
        first.make(None, step)
    folder = tmp_path / "loralab_samples"
    before = {name: (folder / name).read_bytes() for name in _files(folder)}

    fake_render["value"] = 0.75
    second = RunPreviews(_settings(), str(tmp_path))
    for step in (2, 4):
        second.make(None, step)

    assert [p.name for p in first.saved] == ["sample_00001_step00002.png", "sample_00001_step00004.png"]
    assert [p.name for p in second.saved] == ["sample_00002_step00002.png", "sample_00002_step00004.png"]
    assert _files(folder) == sorted(before) + ["sample_00002_step00002.png", "sample_00002_step00004.png"]
    for name, content in before.items():
        assert (folder / name).read_bytes() == content, name
    assert (folder / "sample_00002_step00002.png").read_bytes() != before["sample_00001_step00002.png"]
    # ComfyUI's own SaveImage, pointed at the same prefix, numbers after both runs
    assert folder_paths.get_save_image_path("loralab_samples/sample", str(tmp_path), 64, 64)[2] == 3


def test_previews_of_the_old_single_name_are_left_alone(tmp_path, fake_render):
    folder = tmp_path / "loralab_samples"
    folder.mkdir()
    (folder / "sample_step00002.png").write_bytes(b"an older version's preview")
    run = RunPreviews(_settings(), str(tmp_path))
    run.make(None, 2)
    assert _files(folder) == ["sample_00001_step00002.png", "sample_step00002.png"]
    assert (folder / "sample_step00002.png").read_bytes() == b"an older version's preview"


def test_a_name_taken_after_the_run_started_is_not_overwritten(tmp_path, fake_render):
    """Another writer (a second ComfyUI on the same output folder) took this run's number: the run
    moves on to a fresh number and leaves that file as it was."""
    run = RunPreviews(_settings(), str(tmp_path))
    run.make(None, 2)
    folder = tmp_path / "loralab_samples"
    (folder / "sample_00001_step00004.png").write_bytes(b"someone else's")
    path, _ = run.make(None, 4)
    assert path.name == "sample_00002_step00004.png"
    assert (folder / "sample_00001_step00004.png").read_bytes() == b"someone else's"
    assert [p.name for p in run.saved] == ["sample_00001_step00002.png", "sample_00002_step00004.png"]
    assert _files(folder) == ["sample_00001_step00002.png", "sample_00001_step00004.png",
                              "sample_00002_step00004.png"]  # no temp file left behind


@pytest.mark.parametrize("hard_links", [True, False])
def test_save_png_never_replaces_a_file_and_leaves_no_temp_file(tmp_path, monkeypatch, hard_links):
    if not hard_links:  # a file system without them (some FAT or network shares)
        def no_link(src, dst):
            raise PermissionError(1, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_link)
    path = tmp_path / "p.png"
    save_png(_image(0.5), path, {"k": "v"})
    content = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_png(_image(0.9), path, {"k": "v"})
    assert path.read_bytes() == content
    assert _files(tmp_path) == ["p.png"]
