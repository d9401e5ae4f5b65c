"""Preview images during training: made by ComfyUI's own sampler with the adapter live, saved with
the run's number and the step in the name (no run overwrites another's), shown on the node, and
invisible to training (bit-identical weights)."""
from __future__ import annotations

import asyncio
import io
import json
import re
import struct
import urllib.parse
import urllib.request
import uuid

import aiohttp
import numpy as np
import pytest
import torch
from PIL import Image

import folder_paths

from devkit.comfy_host import execution_error
from loralab.sampler.lora_training import LoraTrainingRequest, train_lora
from loralab.sampler import previews
from loralab.sampler.previews import render
from loralab.sampler.run_outputs import SampleSettings, TrainingEvents
from loralab.sampler.train_sampler import TrainConfig

from server_graphs import node, training_prompt

PREVIEW_IMAGE = 1  # ComfyUI's binary websocket event carrying a preview image


class Recorder(TrainingEvents):
    def __init__(self):
        self.samples = []

    def sample(self, step, path, image):
        self.samples.append((step, path, image))


def _request(steps, samples=None, dtype="fp32"):
    return LoraTrainingRequest(config=TrainConfig(steps=steps, learning_rate=1e-2, seed=4), rank=4, alpha=4.0,
                               training_dtype=dtype, gradient_checkpointing=True, samples=samples)


def test_previews_show_the_live_adapter_and_leave_training_bit_identical(sd15, motif_training_inputs, tmp_path,
                                                                         monkeypatch):
    model, clip, vae = sd15
    latents, positive = motif_training_inputs
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    with torch.inference_mode():  # as the graph encodes it
        prompt = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of lrlb motif"))
    settings = SampleSettings(every=2, positive=prompt, vae=vae, seed=3, width=64, height=96, steps=1,
                              prefix="previews/run")
    events = Recorder()
    with_previews = train_lora(model, latents[:2], positive[:2], _request(4, settings), events=events)
    plain = train_lora(model, latents[:2], positive[:2], _request(4))
    a, b = dict(with_previews.network.named_trainables()), dict(plain.network.named_trainables())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert with_previews.losses == plain.losses

    folder = tmp_path / "previews"  # run 1 in a fresh folder; all previews of the run share the number
    assert sorted(p.name for p in folder.iterdir()) == ["run_00001_step00002.png", "run_00001_step00004.png"]
    assert with_previews.samples == [folder / "run_00001_step00002.png", folder / "run_00001_step00004.png"]
    assert [(s, p) for s, p, _ in events.samples] == [(2, str(folder / "run_00001_step00002.png")),
                                                      (4, str(folder / "run_00001_step00004.png"))]
    images = [image for _, _, image in events.samples]
    for (_, path, image) in events.samples:
        assert image.shape == (1, 96, 64, 3)
        saved = np.asarray(Image.open(path).convert("RGB"))
        assert saved.shape == (96, 64, 3)
        assert np.array_equal(saved, np.clip(255.0 * image[0].numpy(), 0, 255).astype(np.uint8))

    base = render(model, settings)  # the base model, same seed: what the adapter changed
    assert (images[0] - base).abs().mean() > 1e-3
    assert (images[1] - images[0]).abs().mean() > 1e-3  # and it keeps changing as training goes on
    assert torch.equal(render(model, settings), base)  # a fixed seed gives the same picture again


def test_previews_in_a_bf16_run_sample_the_stored_weights_and_leave_training_bit_identical(
        sd15, motif_training_inputs, tmp_path, monkeypatch):
    """A bf16 run holds its frozen fp32 weights as bf16 (sampler/bf16_weights); a preview gives
    them back for its sampling and takes them again after, losslessly."""
    model, clip, vae = sd15
    latents, positive = motif_training_inputs
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    with torch.inference_mode():
        prompt = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of lrlb motif"))
    settings = SampleSettings(every=1, positive=prompt, vae=vae, seed=3, width=64, height=64, steps=1, prefix="bf16/run")
    layer = model.model.diffusion_model.out[2]  # the output conv: never an adapter target
    seen = {"preview": [], "step": []}

    def spying_render(patcher, s):
        seen["preview"].append(layer.weight.dtype)
        return render(patcher, s)

    monkeypatch.setattr(previews, "render", spying_render)
    with_previews = train_lora(model, latents[:2], positive[:2], _request(2, settings, "bf16"),
                               on_step=lambda r: seen["step"].append(layer.weight.dtype))
    plain = train_lora(model, latents[:2], positive[:2], _request(2, dtype="bf16"))
    assert seen == {"preview": [torch.float32] * 2, "step": [torch.bfloat16] * 2}
    a, b = dict(with_previews.network.named_trainables()), dict(plain.network.named_trainables())
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert with_previews.losses == plain.losses


async def _watch_with_previews(server, prompt: dict, timeout: float = 300.0):
    """Queues ``prompt``; returns (text events, preview images) until it finishes. Binary preview
    frames are what the browser draws on the running node."""
    client_id = uuid.uuid4().hex
    events, previews = [], []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
            async with session.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                reply = await r.json()
                assert not reply.get("node_errors"), reply
                prompt_id = reply["prompt_id"]

            async def receive():
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        (kind,) = struct.unpack(">I", msg.data[:4])
                        if kind == PREVIEW_IMAGE:
                            previews.append(Image.open(io.BytesIO(msg.data[8:])))
                        continue
                    event = json.loads(msg.data)
                    events.append(event)
                    data = event.get("data") or {}
                    if event["type"] in ("execution_success", "execution_error", "execution_interrupted") \
                            and data.get("prompt_id") == prompt_id:
                        return
            await asyncio.wait_for(receive(), timeout)
    return events, previews


def _with_sample_prompt(prompt: dict) -> dict:
    prompt["8"] = node("CLIPTextEncode", clip=["1", 1], text="a photo of lrlb motif")
    prompt["5"]["inputs"].update(sample_positive=["8", 0], sample_vae=["1", 2])
    return prompt


PREVIEW_NAME = re.compile(r"sample_(\d{5})_step(\d{5})\.png")


def _view(server, image: dict) -> bytes:
    """The file the node's <img> loads for a reported image."""
    with urllib.request.urlopen(f"{server.url}/view?{urllib.parse.urlencode(image)}", timeout=30) as r:
        return r.read()


def _run_with_previews(server, comfy_base, learning_rate: float, sample_seed: int):
    """One queued run with a preview at steps 1 and 2; returns (prompt id, the images the node
    shows after the run, what each of those files holds right after the run, live preview frames)."""
    prompt = _with_sample_prompt(training_prompt("loralab_motif", steps=2, prefix="loras/previews_http",
                                                 learning_rate=learning_rate, sample_every=1, sample_width=64,
                                                 sample_height=96, sample_steps=1, sample_seed=sample_seed))
    events, frames = asyncio.run(_watch_with_previews(server, prompt))
    assert events[-1]["type"] == "execution_success", events[-1]
    prompt_id = events[-1]["data"]["prompt_id"]
    (executed,) = [e["data"] for e in events if e["type"] == "executed" and e["data"]["node"] == "5"]
    shown = executed["output"]["images"]
    live = [e["data"]["image"] for e in events if e["type"] == "loralab.sample"]
    assert live == shown  # the live chart's previews are the files the node keeps showing
    saved = {image["filename"]: (comfy_base / "output" / image["subfolder"] / image["filename"]).read_bytes()
             for image in shown}
    return prompt_id, shown, saved, frames


def test_previews_appear_on_the_node_and_each_run_keeps_its_own(server, comfy_base):
    """Two runs of the same graph (say, two learning rates): the second run's previews get new names,
    and the first run's node output, history entry and files still show the first run's images."""
    first_id, first, first_saved, frames = _run_with_previews(server, comfy_base, 0.001, sample_seed=1)
    assert frames, "no preview image reached the node while training ran"
    width, height = frames[-1].size  # ComfyUI scales node previews to fit 512 px
    assert max(width, height) == 512 and abs(width / height - 64 / 96) < 0.01
    second_id, second, second_saved, _ = _run_with_previews(server, comfy_base, 0.01, sample_seed=2)

    numbers = []
    for shown in (first, second):
        assert [(i["subfolder"], i["type"]) for i in shown] == [("loralab_samples", "output")] * 2
        names = [PREVIEW_NAME.fullmatch(i["filename"]) for i in shown]
        assert all(names), shown
        assert [int(m[2]) for m in names] == [1, 2]  # global steps
        (number,) = {m[1] for m in names}  # one number for all previews of a run
        numbers.append(int(number))
    assert numbers[1] > numbers[0]

    folder = comfy_base / "output" / "loralab_samples"
    for name, content in first_saved.items():  # the first run's files, untouched by the second run
        assert (folder / name).read_bytes() == content, name
    assert set(second_saved.values()).isdisjoint(first_saved.values())  # so an overwrite would have shown
    history = server.get_json(f"/history/{first_id}")[first_id]
    assert history["outputs"]["5"]["images"] == first  # the first run's entry still points at its own files
    assert [_view(server, image) for image in first] == list(first_saved.values())
    assert server.get_json(f"/history/{second_id}")[second_id]["outputs"]["5"]["images"] == second
    assert Image.open(folder / first[0]["filename"]).size == (64, 96)


@pytest.mark.parametrize("inputs, expected", [
    (dict(sample_every=2), "sample_vae"),
    (dict(sample_every=2, sample_width=100, connect=True), "sample_width is 100"),
    (dict(sample_every=2, sample_height=68, connect=True), "multiple of 8"),
])
def test_bad_preview_inputs_fail_before_training_with_a_clear_message(server, comfy_base, inputs, expected):
    inputs = dict(inputs)
    connect = inputs.pop("connect", False)
    samples = comfy_base / "output" / "bad_previews"
    prompt = training_prompt("loralab_motif", steps=3, prefix="loras/bad_previews", **inputs)
    prompt["5"]["inputs"]["checkpoint_prefix"] = "bad_previews/ckpt"
    if connect:
        prompt = _with_sample_prompt(prompt)
    error = execution_error(server.run_prompt(prompt))
    assert error is not None and error["node_type"] == "LoraLab_TrainLora"
    assert expected in error["exception_message"]
    assert not samples.exists()  # no checkpoint, preview or temp file
    assert not list((comfy_base / "output" / "loras").glob("bad_previews*"))
    assert server.is_alive() and server.get_json("/system_stats")
