"""Progress reaches the browser step by step, and Interrupt stops training cleanly."""
from __future__ import annotations

import time

from devkit.comfy_events import post_interrupt, run_and_watch
from devkit.comfy_host import execution_error

from server_graphs import training_prompt

TRAIN_NODE = "5"


def test_progress_reports_every_step_of_training(server, motif_dir):
    events = run_and_watch(server, training_prompt("loralab_motif", steps=3, prefix="loras/progress"))
    progress = [e["data"] for e in events if e["type"] == "progress" and e["data"].get("node") == TRAIN_NODE]
    assert [(p["value"], p["max"]) for p in progress] == [(1, 3), (2, 3), (3, 3)]
    assert events[-1]["type"] == "execution_success"


def test_interrupt_stops_training_within_a_step_and_server_goes_on(server, motif_dir, comfy_base):
    state = {"sent": None}

    def on_event(event):
        data = event.get("data") or {}
        if event["type"] == "progress" and data.get("node") == TRAIN_NODE and state["sent"] is None:
            state["sent"] = time.monotonic()
            post_interrupt(server)

    events = run_and_watch(server, training_prompt("loralab_motif", steps=500, prefix="loras/interrupted"), on_event)
    assert state["sent"] is not None, "training never reported progress"
    assert events[-1]["type"] == "execution_interrupted"
    assert time.monotonic() - state["sent"] < 30
    steps_done = max(e["data"]["value"] for e in events if e["type"] == "progress" and e["data"].get("node") == TRAIN_NODE)
    assert steps_done <= 3
    assert not list((comfy_base / "output" / "loras").glob("interrupted_*"))  # SaveLoRA never ran
    # ...but the work is kept: a resumable checkpoint of the last completed step (default checkpoint_prefix;
    # a step may complete after its progress event was sent, when the interrupt lands in the progress hook)
    saved = {int(p.name[len("loralab_checkpoint_step"):][:5])
             for p in (comfy_base / "output" / "loras").glob("loralab_checkpoint_step*_interrupted.safetensors")}
    assert saved & {steps_done, steps_done + 1}, saved

    entry = server.run_prompt(training_prompt("loralab_motif", steps=1, prefix="loras/after_interrupt"))
    assert execution_error(entry) is None
    assert list((comfy_base / "output" / "loras").glob("after_interrupt_1_steps_00001_.safetensors"))
