"""ComfyUI's own executor, in-process, re-runs Load Image Set when its folder's files change and
still serves it from cache when nothing changed (fingerprint_inputs, the V3 IS_CHANGED)."""
from __future__ import annotations

import asyncio
import copy

import pytest
from PIL import Image

import execution
import folder_paths
import nodes
from comfy_api.latest import io

from loralab.nodes_dataset import LoadImageSet

SEEN: list[list[str]] = []  # captions each run of the stand-in trainer received


class ShowCaptions(io.ComfyNode):
    """Stands in for the trainer: an output node that records the captions it is given."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="LoraLabTest_ShowCaptions", is_output_node=True, is_input_list=True,
                         inputs=[io.String.Input("captions", force_input=True)], outputs=[])

    @classmethod
    def execute(cls, captions):
        SEEN.append(list(captions))
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
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "LoraLabTest_ShowCaptions", ShowCaptions)
    old_input = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path))
    server = StandInServer()
    executor = execution.PromptExecutor(server, cache_args={"lru": 0, "ram": 0})
    SEEN.clear()

    def run(prompt_id: str) -> list[str]:
        prompt = copy.deepcopy(PROMPT)  # a fresh dict per queue, as the server parses one per POST
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        assert valid[0], valid
        server.messages.clear()
        executor.execute(prompt, prompt_id, {"client_id": "test"}, valid[2])
        assert executor.success, executor.status_messages
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
