"""folder_fingerprint and LoadImageSet.fingerprint_inputs: ComfyUI re-runs the node (instead of
reusing cached images and captions) exactly when the files it would read change."""
import os
from pathlib import Path

import pytest
from PIL import Image

import folder_paths
from comfy_api.internal import first_real_override
from dataset import folder_fingerprint
from loralab.nodes_dataset import LoadImageSet


def solid(path: Path, color="red", size=(16, 16)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    solid(folder / "a.png")
    solid(folder / "b.png", "blue")
    (folder / "a.txt").write_text("a red square")
    return folder


def keep_mtime(path: Path, write):
    """Runs ``write`` and puts the old mtime back: an edit a coarse-mtime filesystem would miss."""
    st = path.stat()
    write()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_same_files_give_the_same_fingerprint(image_folder):
    assert folder_fingerprint(image_folder) == folder_fingerprint(image_folder)
    assert folder_fingerprint(str(image_folder)) == folder_fingerprint(image_folder)
    assert len(folder_fingerprint(image_folder)) == 64  # sha256 hex


def test_caption_edit_changes_it_even_with_same_size_and_mtime(image_folder):
    before = folder_fingerprint(image_folder)
    caption = image_folder / "a.txt"
    keep_mtime(caption, lambda: caption.write_text("a RED square"))  # same length, same mtime
    assert folder_fingerprint(image_folder) != before


def test_caption_added_or_removed_changes_it(image_folder):
    before = folder_fingerprint(image_folder)
    (image_folder / "b.txt").write_text("blue")
    with_b = folder_fingerprint(image_folder)
    assert with_b != before
    (image_folder / "b.txt").unlink()
    assert folder_fingerprint(image_folder) == before


def test_image_added_removed_or_replaced_changes_it(image_folder):
    before = folder_fingerprint(image_folder)
    solid(image_folder / "c.png", "green")
    added = folder_fingerprint(image_folder)
    assert added != before
    (image_folder / "c.png").unlink()
    assert folder_fingerprint(image_folder) == before
    (image_folder / "b.png").unlink()
    assert folder_fingerprint(image_folder) != before
    solid(image_folder / "b.png", "blue", size=(24, 24))  # a different image under the same name
    assert folder_fingerprint(image_folder) != before


def test_touched_image_changes_it(image_folder):
    before = folder_fingerprint(image_folder)
    st = (image_folder / "a.png").stat()
    os.utime(image_folder / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert folder_fingerprint(image_folder) != before


def test_files_the_loader_ignores_do_not_change_it(image_folder):
    before = folder_fingerprint(image_folder)
    (image_folder / "notes.md").write_text("to do")
    (image_folder / "orphan.txt").write_text("a caption without an image")
    solid(image_folder / ".hidden.png")
    (image_folder / "sub").mkdir()
    solid(image_folder / "sub" / "inner.png")
    (image_folder / "sub" / "inner.txt").write_text("inner")
    assert folder_fingerprint(image_folder) == before


def test_unlistable_folders_do_not_raise(tmp_path):
    missing, empty, a_file = tmp_path / "missing", tmp_path / "empty", solid(tmp_path / "x.png")
    empty.mkdir()
    prints = {folder_fingerprint(p) for p in (missing, empty, a_file)}
    assert len(prints) == 3  # each reason has its own value
    solid(empty / "first.png")
    assert folder_fingerprint(empty) not in prints  # the folder filling up counts as a change


def test_node_overrides_fingerprint_inputs_so_comfyui_calls_it():
    assert first_real_override(LoadImageSet, "fingerprint_inputs") is not None


def test_node_fingerprint_follows_the_folder_under_the_input_directory(image_folder, monkeypatch):
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(image_folder.parent))
    widgets = dict(resize_method="Crop", width=64, height=64, default_caption="", bucketing=False)
    before = LoadImageSet.fingerprint_inputs(folder="set", **widgets)
    assert before == folder_fingerprint(image_folder)
    (image_folder / "a.txt").write_text("edited caption")
    assert LoadImageSet.fingerprint_inputs(folder="set", **widgets) != before
    assert isinstance(LoadImageSet.fingerprint_inputs(folder="gone", **widgets), str)  # no exception
