"""The live side in a real ComfyUI: loralab.* websocket events of a training run, GET
/loralab/history (what a page reloaded mid-run reads), the js/ extension served to the frontend,
and the locales/ translations served at /i18n."""
from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request

from devkit.comfy_events import post_interrupt, run_and_watch
from devkit.comfy_host import PACK_DIR, PACK_LINK_NAME
from loralab.report.loss_plot import smooth_losses

from server_graphs import node, training_prompt

TRAIN_NODE, LOSS_NODE = "5", "8"
STEPS = 6


def live(events, kind):
    return [e["data"] for e in events if e["type"] == f"loralab.{kind}" and e["data"].get("node") == TRAIN_NODE]


def points_of(progress):
    return [p for msg in progress for p in msg["points"]]


def test_progress_events_carry_every_step_once_and_history_serves_them(server, motif_dir):
    prompt = training_prompt("loralab_motif", steps=STEPS, prefix="loras/live")
    prompt["2"]["inputs"].update(width=128, height=128)
    prompt[LOSS_NODE] = node("LoraLab_LossGraph", loss=[TRAIN_NODE, 2], filename_prefix="live/loss")
    seen = {"mid": None, "points_before": None}

    def on_event(event):
        # The reload path: a page opened mid-run asks the server for the run so far.
        if event["type"] == "loralab.progress" and seen["mid"] is None and event["data"]["step"] < STEPS:
            seen["points_before"] = points_of([e["data"] for e in events_so_far if e["type"] == "loralab.progress"])
            seen["points_before"] += event["data"]["points"]
            seen["mid"] = server.get_json(f"/loralab/history?node={TRAIN_NODE}")
        events_so_far.append(event)

    events_so_far: list[dict] = []
    events = run_and_watch(server, prompt, on_event)
    assert events[-1]["type"] == "execution_success"
    prompt_id = events[-1]["data"]["prompt_id"]
    loss_map = server.wait_for(prompt_id)["outputs"][LOSS_NODE]["loss"]  # history lands just after the event
    assert len(loss_map) == STEPS

    progress = live(events, "progress")
    assert all(m["prompt_id"] == prompt_id and m["total"] == STEPS for m in progress)
    points = points_of(progress)
    assert [p[0] for p in points] == list(range(1, STEPS + 1))  # every step once, in order
    assert [p[1] for p in points] == loss_map  # the very values of the node's LOSS_MAP
    assert [p[2] for p in points] == [float(v) for v in smooth_losses(loss_map)]  # the Loss Graph's smoothing
    steps = [m["step"] for m in progress]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == STEPS
    last = progress[-1]
    assert (last["global_step"], last["loss"]) == (STEPS, loss_map[-1])
    assert last["s_per_step"] > 0 and last["eta_s"] == 0

    statuses = live(events, "status")
    assert [s["status"] for s in statuses] == ["running", "finished"]
    order = [e["type"] for e in events if e["type"].startswith("loralab.")]
    assert order[0] == "loralab.status" and order[-1] == "loralab.status"

    mid = seen["mid"]
    assert mid is not None, "no progress event arrived before the last step"
    (mid_run,) = mid["runs"]
    assert mid_run["status"] == "running" and mid_run["prompt_id"] == prompt_id and mid_run["total"] == STEPS
    assert mid_run["points"][:len(seen["points_before"])] == seen["points_before"]
    assert mid_run["points"] == points[:len(mid_run["points"])]

    for route in ("/loralab/history", "/api/loralab/history"):  # the frontend's fetchApi uses /api
        runs = [r for r in server.get_json(route)["runs"] if r["node"] == TRAIN_NODE]
        assert len(runs) == 1
        run = runs[0]
        assert (run["prompt_id"], run["status"], run["step"], run["total"]) == (prompt_id, "finished", STEPS, STEPS)
        assert run["points"] == points and run["loss"] == loss_map[-1]


def test_interrupt_reports_the_points_so_far_the_checkpoint_and_the_interrupted_status(server, motif_dir,
                                                                                       comfy_base):
    asked = {"done": False}

    def on_event(event):
        if event["type"] == "loralab.progress" and not asked["done"]:
            asked["done"] = True
            post_interrupt(server)

    prompt = training_prompt("loralab_motif", steps=500, prefix="loras/live_stop", checkpoint_prefix="loras/live_stop_ck")
    events = run_and_watch(server, prompt, on_event)
    assert events[-1]["type"] == "execution_interrupted"
    assert [s["status"] for s in live(events, "status")] == ["running", "interrupted"]
    points = points_of(live(events, "progress"))
    (run,) = server.get_json(f"/loralab/history?node={TRAIN_NODE}")["runs"]
    assert run["status"] == "interrupted" and run["total"] == 500
    assert points == run["points"] and [p[0] for p in points] == list(range(1, run["step"] + 1))

    (checkpoint,) = live(events, "checkpoint")  # the node's message line: where the work is, how to go on
    assert checkpoint["reason"] == "interrupted" and checkpoint["step"] == run["step"]
    assert (comfy_base / "output" / checkpoint["path"]).is_file()
    assert checkpoint["path"].startswith("loras/live_stop_ck") and "existing_lora" in checkpoint["message"]
    assert run["checkpoints"] == [{k: checkpoint[k] for k in ("step", "reason", "path", "message")}]
    order = [e["type"] for e in events if e["type"].startswith("loralab.")]
    assert order[-2:] == ["loralab.checkpoint", "loralab.status"]


def test_previews_and_periodic_checkpoints_reach_the_browser(server, motif_dir, comfy_base):
    prompt = training_prompt("loralab_motif", steps=4, prefix="loras/live_previews", sample_every=2,
                             sample_positive=["9", 0], sample_vae=["1", 2], sample_width=64, sample_height=64,
                             sample_steps=1, save_every=2, keep_last=5, checkpoint_prefix="loras/live_periodic")
    prompt["9"] = node("CLIPTextEncode", clip=["1", 1], text="a photo of lrlb motif")
    events = run_and_watch(server, prompt)
    assert events[-1]["type"] == "execution_success"
    samples, checkpoints = live(events, "sample"), live(events, "checkpoint")
    assert [s["step"] for s in samples] == [2, 4] and [c["step"] for c in checkpoints] == [2, 4]
    for s in samples:
        image = s["image"]
        assert image["type"] == "output"
        query = urllib.parse.urlencode(image)
        status, body = _get(server, f"/view?{query}")  # what the node's <img> loads
        assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"
    for c in checkpoints:
        assert c["reason"] == "periodic" and (comfy_base / "output" / c["path"]).is_file()
    (run,) = server.get_json(f"/loralab/history?node={TRAIN_NODE}")["runs"]
    assert [s["image"] for s in run["samples"]] == [s["image"] for s in samples]
    assert [c["path"] for c in run["checkpoints"]] == [c["path"] for c in checkpoints]


def _get(server, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(server.url + path, timeout=30) as r:
        return r.status, r.read()


def test_the_extension_is_listed_served_and_its_imports_resolve(server):
    listed = server.get_json("/extensions")
    js_files = sorted(p.relative_to(PACK_DIR / "js").as_posix() for p in (PACK_DIR / "js").rglob("*.js"))
    assert "loralab_train.js" in js_files
    for rel in js_files:
        url = f"/extensions/{PACK_LINK_NAME}/{rel}"
        assert url in listed, f"{url} is not in the frontend's extension list"
        status, body = _get(server, url)
        assert status == 200
        for target in re.findall(r'^import .* from "([^"]+)";', body.decode(), flags=re.M):
            resolved = urllib.parse.urljoin(url, target)
            assert _get(server, resolved)[0] == 200, f"{rel} imports {target} -> {resolved}, which is not served"
    _, main = _get(server, f"/extensions/{PACK_LINK_NAME}/loralab_train.js")
    assert b"registerExtension" in main and b"loralab-chart" in main and b"window.LoraLab" in main


def test_the_translations_are_served_at_i18n(server):
    served = server.get_json("/i18n")["en"]
    ours = json.loads((PACK_DIR / "locales" / "en" / "nodeDefs.json").read_text(encoding="utf-8"))
    for node_id, entry in ours.items():
        assert served["nodeDefs"][node_id] == entry
    main = json.loads((PACK_DIR / "locales" / "en" / "main.json").read_text(encoding="utf-8"))
    assert served["nodeCategories"]["LoRA Lab"] == main["nodeCategories"]["LoRA Lab"]
