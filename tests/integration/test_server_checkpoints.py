"""Cancel keeps the work, over HTTP: /interrupt saves a resumable checkpoint that appears in
existing_lora, and resuming from it gives bit for bit the adapter of one uninterrupted run."""
from __future__ import annotations

import re
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from devkit.comfy_events import post_interrupt, run_and_watch
from devkit.comfy_host import execution_error

from server_graphs import training_prompt

TRAIN_NODE = "5"
TRAIN = dict(seed=5, learning_rate=0.002)  # fp32 on CPU (training_prompt's dtype), the same in every run


def _tensors(path):
    return safetensors.torch.load_file(str(path))


def test_interrupt_checkpoint_resumes_bit_exactly(server, comfy_base):
    loras = comfy_base / "output" / "loras"
    sent = []

    def on_event(event):
        data = event.get("data") or {}
        if event["type"] == "progress" and data.get("node") == TRAIN_NODE and not sent:
            sent.append(data["value"])
            post_interrupt(server)

    events = run_and_watch(server, training_prompt("loralab_motif", steps=200, prefix="loras/ckhttp_never",
                                                   checkpoint_prefix="loras/ckhttp", **TRAIN), on_event)
    assert sent, "training never reported progress"
    assert events[-1]["type"] == "execution_interrupted"
    (checkpoint,) = loras.glob("ckhttp_step*_interrupted.safetensors")
    done = int(re.fullmatch(r"ckhttp_step(\d{5})_interrupted\.safetensors", checkpoint.name).group(1))
    assert 1 <= done <= sent[0] + 2  # stopped within a step or two of the interrupt
    state = checkpoint.with_suffix(".trainstate")
    with safetensors.safe_open(str(state), "pt") as f:
        assert int(f.metadata()["step"]) == done
    assert not list(loras.glob("ckhttp_never_*"))  # SaveLoRA never ran
    log = server.log_text()
    assert f"{checkpoint.name}' as existing_lora" in log and f"set steps to {200 - done}" in log

    # the checkpoint is listed where existing_lora (and LoraLoader) look, after a refresh
    fresh_info = server.get_json("/object_info/LoraLab_TrainLora")["LoraLab_TrainLora"]
    assert checkpoint.name in fresh_info["input"]["required"]["existing_lora"][1]["options"]

    extra = 2
    resumed = server.run_prompt(training_prompt("loralab_motif", steps=extra, prefix="loras/ckhttp_resumed",
                                                existing_lora=checkpoint.name, **TRAIN))
    assert execution_error(resumed) is None, execution_error(resumed)
    whole = server.run_prompt(training_prompt("loralab_motif", steps=done + extra, prefix="loras/ckhttp_whole", **TRAIN))
    assert execution_error(whole) is None, execution_error(whole)

    total = done + extra
    (a,) = loras.glob(f"ckhttp_resumed_{total}_steps_00001_.safetensors")
    (b,) = loras.glob(f"ckhttp_whole_{total}_steps_00001_.safetensors")
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and ta
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    # and the comparison means something: the checkpoint itself is a different (earlier) adapter
    tc = _tensors(checkpoint)
    assert any(not torch.equal(tc[k], ta[k]) for k in ta)


def test_checkpoint_prefix_outside_the_output_directory_is_refused(server, comfy_base):
    for prefix in ("../escaped/ckpt", "/tmp/loralab_escaped_ckpt"):
        entry = server.run_prompt(training_prompt("loralab_motif", steps=2, prefix="loras/escaped_never",
                                                  checkpoint_prefix=prefix, save_every=1))
        error = execution_error(entry)
        assert error is not None and error["node_type"] == "LoraLab_TrainLora"
        message = error["exception_message"]
        assert "checkpoint_prefix" in message and prefix in message and "output directory" in message
    assert not (comfy_base / "escaped").exists()
    assert not list((comfy_base / "output" / "loras").glob("escaped_never*"))
    assert not list(Path("/tmp").glob("loralab_escaped_ckpt*"))
    assert server.is_alive() and server.get_json("/system_stats")
