"""ComfyUI's own executor, in-process, re-runs Load Image Set when its folder's files change and
still serves it from cache when nothing changed (fingerprint_inputs, the V3 IS_CHANGED); and Image
Set from Images takes batches, lists and caption lists whole."""
from __future__ import annotations

import asyncio
import copy

import pytest
from PIL import Image

import execution
import folder_paths
import nodes
from comfy_api.latest import io

from loralab.nodes_dataset import ImageSetFromImages, LoadImageSet

SEEN: list[list[str]] = []  # captions each run of the stand-in trainer received
SIZES: list[list[tuple]] = []  # image shapes each run of the stand-in trainer received, when connected


class ShowCaptions(io.ComfyNode):
    """Stands in for the trainer: an output node that records the captions (and images) it is given."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="LoraLabTest_ShowCaptions", is_output_node=True, is_input_list=True,
                         inputs=[io.String.Input("captions", force_input=True), io.Image.Input("images", optional=True)],
                         outputs=[])

    @classmethod
    def execute(cls, captions, images=None):
        SEEN.append(list(captions))
        if images is not None:
            SIZES.append([tuple(i.shape) for i in images])
        return io.NodeOutput()


class StandInServer:
    """The bits of PromptServer the executor touches; keeps the messages it would send."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


PROMPT = {
    "1": {"class_type": "LoraLab_LoadImageSet",
          "inputs": {"folder": "set", "resize_method": "Crop", "width": 64, "height": 64,
                     "default_caption": "", "bucketing": False}},
    "2": {"class_type": "LoraLabTest_ShowCaptions", "inputs": {"captions": ["1", 1]}},
}


@pytest.fixture
def queue(tmp_path, monkeypatch):
    """Queues PROMPT on one executor (so its cache persists between runs); returns cached node ids."""
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "LoraLab_LoadImageSet", LoadImageSet)
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "LoraLab_ImageSetFromImages", ImageSetFromImages)
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "LoraLabTest_ShowCaptions", ShowCaptions)
    old_input = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path))
    server = StandInServer()
    executor = execution.PromptExecutor(server, cache_args={"lru": 0, "ram": 0})
    SEEN.clear()
    SIZES.clear()

    def run(prompt_id: str, graph: dict = PROMPT, succeeds: bool = True) -> list[str] | str:
        """The cached node ids of a successful run, or the error message of a failed one."""
        prompt = copy.deepcopy(graph)  # a fresh dict per queue, as the server parses one per POST
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        assert valid[0], valid
        server.messages.clear()
        executor.execute(prompt, prompt_id, {"client_id": "test"}, valid[2])
        assert executor.success == succeeds, executor.status_messages
        if not succeeds:
            return next(d["exception_message"] for e, d in server.messages if e == "execution_error")
        return next(d["nodes"] for e, d in server.messages if e == "execution_cached")

    yield run
    folder_paths.set_input_directory(old_input)


def test_edited_caption_and_added_image_reach_the_downstream_node(tmp_path, queue):
    folder = tmp_path / "set"
    folder.mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "a.png")
    (folder / "a.txt").write_text("old caption")

    assert queue("first") == []
    assert SEEN == [["old caption"]]

    assert sorted(queue("unchanged")) == ["1", "2"]  # nothing on disk changed: all from cache
    assert len(SEEN) == 1

    (folder / "a.txt").write_text("new caption")  # same length as before
    assert queue("caption edited") == []
    assert SEEN[-1] == ["new caption"]

    (folder / "notes.md").write_text("not part of the set")
    assert sorted(queue("unrelated file")) == ["1", "2"]

    Image.new("RGB", (64, 64), "blue").save(folder / "b.png")
    (folder / "b.txt").write_text("a blue square")
    assert queue("image added") == []
    assert SEEN[-1] == ["new caption", "a blue square"]

    (folder / "a.png").unlink()
    assert queue("image removed") == []
    assert SEEN[-1] == ["a blue square"]


def _from_images(images: list, captions) -> dict:
    """Load Image Set (folder "set") and a 3-image EmptyImage batch into Image Set from Images."""
    return {
        **PROMPT,
        "3": {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 40, "batch_size": 3, "color": 0}},
        "4": {"class_type": "LoraLab_ImageSetFromImages",
              "inputs": {"images": images, "captions": captions, "resize_method": "None", "width": 64, "height": 64,
                         "bucketing": False}},
        "2": {"class_type": "LoraLabTest_ShowCaptions", "inputs": {"captions": ["4", 1], "images": ["4", 0]}},
    }


def test_image_set_from_images_pairs_lists_and_batches_one_to_one(tmp_path, queue):
    folder = tmp_path / "set"
    folder.mkdir()
    for name in "abc":
        Image.new("RGB", (64, 64), "red").save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"caption {name}")

    queue("batch with a caption list", _from_images(["3", 0], ["1", 1]))  # EmptyImage batch, Load Image Set captions
    assert SEEN[-1] == ["caption a", "caption b", "caption c"]  # three images, not one per caption per image
    assert SIZES[-1] == [(1, 40, 48, 3)] * 3

    queue("list with typed lines", _from_images(["1", 0], "one\ntwo\nthree"))  # the folder's images, as a list
    assert SEEN[-1] == ["one", "two", "three"]
    assert SIZES[-1] == [(1, 64, 64, 3)] * 3  # one entry per image of the list, not per caption line

    message = queue("lines do not match", _from_images(["3", 0], "one\ntwo"), succeeds=False)
    assert "captions has 2 lines but images has 3 images" in message
