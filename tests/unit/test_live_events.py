"""The live-event sink: throttled progress that never loses a point, the same smoothing as the loss
plot, s/step and ETA from the wall clock, history for a reloaded page, and paths the browser can view."""
from __future__ import annotations

import json
import math
import random
import sys

import pytest

from loralab.report.live import (CHECKPOINT, MAX_RUNS, PROGRESS, SAMPLE, STATUS, LiveTrainingEvents, RunHistory,
                                 LiveRun, RunningSmoother, Throttle, register_routes, send_to_browser, workflow_id)
from loralab.report.loss_plot import smooth_losses
from loralab.sampler.train_sampler import StepReport


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class Recorder:
    """A send function that keeps what would have gone to the browser, JSON round-tripped as the
    websocket does (strictly: the browser's JSON.parse rejects NaN)."""

    def __init__(self):
        self.events = []

    def __call__(self, event, data):
        self.events.append((event, json.loads(json.dumps(data, allow_nan=False))))

    def of(self, kind):
        return [d for e, d in self.events if e == kind]


def make_sink(clock=None, history=None, node="7", prompt="p1", output_dir=None, interval=0.3, workflow=""):
    rec = Recorder()
    sink = LiveTrainingEvents(node, prompt, output_dir, send=rec, clock=clock or FakeClock(),
                              history=history or RunHistory(), interval=interval, workflow=workflow)
    return sink, rec


def run_steps(sink, clock, losses, seconds_per_step, completed_before=0):
    total = len(losses)
    sink.started(total, completed_before)
    for i, loss in enumerate(losses, start=1):
        clock.t += seconds_per_step
        sink.step(StepReport(i, total, loss, seconds_per_step, lr=1e-3, completed=completed_before + i))


def all_points(rec):
    return [p for msg in rec.of(PROGRESS) for p in msg["points"]]


# --- smoothing ---------------------------------------------------------------------------------


def test_running_smoother_equals_smooth_losses_value_by_value():
    rng = random.Random(3)
    values = [rng.uniform(0.01, 2.0) for _ in range(300)]
    values[10], values[50], values[51] = float("nan"), float("inf"), float("-inf")
    smoother = RunningSmoother()
    running = [smoother.add(v) for v in values]
    expected = smooth_losses(values)
    for got, want in zip(running, expected):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-12, abs=0)


def test_running_smoother_rejects_a_weight_smooth_losses_rejects():
    with pytest.raises(ValueError, match="weight"):
        RunningSmoother(1.0)


# --- throttle ----------------------------------------------------------------------------------


def test_throttle_first_and_last_always_and_interval_between():
    clock = FakeClock()
    throttle = Throttle(0.5, clock)
    decisions = []
    for step in range(1, 11):
        decisions.append(throttle.due(step, 10))
        clock.t += 0.2
    # t = 0 (first), 0.2, 0.4, 0.6 (>=0.5 since 0), 0.8, 1.0, 1.2 (>=0.5 since 0.6), 1.4, 1.6, 1.8 (last)
    assert decisions == [True, False, False, True, False, False, True, False, False, True]


def test_many_fast_steps_give_few_messages_and_every_point_once():
    clock = FakeClock()
    sink, rec = make_sink(clock)
    losses = [1.0 / (i + 1) for i in range(1000)]
    run_steps(sink, clock, losses, seconds_per_step=0.01)  # 10 s of training, 0.3 s throttle
    messages = rec.of(PROGRESS)
    assert len(messages) <= 10 / 0.3 + 2
    assert len(messages) >= 10 / 0.3 - 1  # it does send at the interval, not only at the end
    points = all_points(rec)
    assert [p[0] for p in points] == list(range(1, 1001))
    assert [p[1] for p in points] == pytest.approx(losses)
    assert [p[2] for p in points] == pytest.approx(smooth_losses(losses))
    assert messages[0]["points"] == [[1, pytest.approx(losses[0]), pytest.approx(losses[0])]]
    last = messages[-1]
    assert (last["step"], last["total"], last["global_step"]) == (1000, 1000, 1000)
    assert last["loss"] == pytest.approx(losses[-1]) and last["smoothed"] == pytest.approx(points[-1][2])


def test_slow_steps_send_every_step():
    clock = FakeClock()
    sink, rec = make_sink(clock)
    run_steps(sink, clock, [0.5, 0.4, 0.3, 0.2], seconds_per_step=2.0)
    assert [len(m["points"]) for m in rec.of(PROGRESS)] == [1, 1, 1, 1]


def test_interrupt_between_messages_flushes_the_points_not_yet_sent():
    clock = FakeClock()
    sink, rec = make_sink(clock)
    sink.started(100, 0)
    for i in range(1, 8):
        clock.t += 0.01
        sink.step(StepReport(i, 100, 0.1 * i, 0.01, completed=i))
    assert [p[0] for p in all_points(rec)] == [1]  # throttled: only the first step went out
    sink.finished("interrupted")
    assert [p[0] for p in all_points(rec)] == list(range(1, 8))
    assert [s["status"] for s in rec.of(STATUS)] == ["running", "interrupted"]
    assert rec.events[-1][0] == STATUS  # the status comes after the last points


# --- speed, continuing runs, odd values --------------------------------------------------------


def test_seconds_per_step_and_eta_come_from_the_wall_clock():
    clock = FakeClock()
    sink, rec = make_sink(clock, interval=0.0)
    sink.started(10, 0)
    for i, dt in enumerate([5.0, 2.0, 2.0, 2.0], start=1):  # step 1 includes warm-up
        clock.t += dt
        sink.step(StepReport(i, 10, 0.5, 0.1, completed=i))  # report.seconds ignores previews: not used
    last = rec.of(PROGRESS)[-1]
    assert last["s_per_step"] == pytest.approx(11.0 / 4)
    assert last["eta_s"] == pytest.approx(11.0 / 4 * 6)
    sink.finished("finished")
    assert sink.history.snapshot()["runs"][0]["eta_s"] == 0.0


def test_continued_run_reports_global_steps_and_run_steps():
    clock = FakeClock()
    sink, rec = make_sink(clock, interval=0.0)
    run_steps(sink, clock, [0.3, 0.2, 0.1], seconds_per_step=1.0, completed_before=40)
    msgs = rec.of(PROGRESS)
    assert [(m["step"], m["total"], m["global_step"]) for m in msgs] == [(1, 3, 41), (2, 3, 42), (3, 3, 43)]
    assert [p[0] for p in all_points(rec)] == [41, 42, 43]


def test_nan_loss_is_sent_as_null_and_smoothing_skips_it():
    clock = FakeClock()
    sink, rec = make_sink(clock, interval=0.0)
    run_steps(sink, clock, [0.4, float("nan"), 0.2], seconds_per_step=1.0)
    points = all_points(rec)
    assert points[1] == [2, None, None]
    assert points[2][2] == pytest.approx(smooth_losses([0.4, float("nan"), 0.2])[2])
    json.dumps(sink.history.snapshot(), allow_nan=False)  # the history route's body is strict JSON too


def test_a_failing_socket_does_not_stop_training():
    def broken(event, data):
        raise ConnectionResetError("socket gone")

    history = RunHistory()
    sink = LiveTrainingEvents("3", "p", send=broken, clock=FakeClock(), history=history)
    sink.started(2, 0)
    sink.step(StepReport(1, 2, 0.5, 0.1, completed=1))
    sink.step(StepReport(2, 2, 0.4, 0.1, completed=2))
    sink.finished("finished")
    (run,) = history.snapshot()["runs"]
    assert run["status"] == "finished" and [p[0] for p in run["points"]] == [1, 2]


# --- history -----------------------------------------------------------------------------------


def test_history_holds_the_same_points_the_socket_carried_mid_run_and_after():
    clock = FakeClock()
    history = RunHistory()
    sink, rec = make_sink(clock, history)
    sink.started(50, 0)
    for i in range(1, 21):
        clock.t += 0.05
        sink.step(StepReport(i, 50, 1.0 / i, 0.05, completed=i))
    (mid,) = history.snapshot("7")["runs"]
    assert mid["status"] == "running" and mid["step"] == 20 and mid["total"] == 50
    assert [p[0] for p in mid["points"]] == list(range(1, 21))  # also points the throttle still holds
    for i in range(21, 51):
        clock.t += 0.05
        sink.step(StepReport(i, 50, 1.0 / i, 0.05, completed=i))
    sink.finished("finished")
    (done,) = history.snapshot()["runs"]
    assert done["points"] == all_points(rec)
    assert done["status"] == "finished" and done["prompt_id"] == "p1" and done["node"] == "7"


def test_history_keeps_the_latest_run_per_node_and_a_bounded_number_of_nodes():
    history = RunHistory()
    first, _ = make_sink(history=history, node="1", prompt="a")
    run_steps(first, FakeClock(), [0.5, 0.4], 1.0)
    again, _ = make_sink(history=history, node="1", prompt="b")
    run_steps(again, FakeClock(), [0.3], 1.0)
    runs = history.snapshot()["runs"]
    assert [(r["node"], r["prompt_id"], len(r["points"])) for r in runs] == [("1", "b", 1)]
    for n in range(2, MAX_RUNS + 4):
        sink, _ = make_sink(history=history, node=str(n))
        run_steps(sink, FakeClock(), [0.1], 1.0)
    nodes = [r["node"] for r in history.snapshot()["runs"]]
    assert len(nodes) == MAX_RUNS and nodes[-1] == str(MAX_RUNS + 3) and "1" not in nodes
    assert history.snapshot("nope") == {"runs": []}


def test_the_same_node_id_in_two_workflows_keeps_two_runs_and_every_event_names_its_workflow():
    """Every template has a Train LoRA node 5: a run of one workflow must not replace (or show up
    as) the run of another workflow's node 5."""
    history = RunHistory()
    basic, rec = make_sink(history=history, node="5", prompt="a", workflow="wf-basic")
    run_steps(basic, FakeClock(), [0.5, 0.4], 1.0)
    basic.finished("finished")
    other, _ = make_sink(history=history, node="5", prompt="b", workflow="wf-continue")
    run_steps(other, FakeClock(), [0.3], 1.0)
    runs = {r["workflow"]: r for r in history.snapshot(node="5")["runs"]}
    assert {w: (r["prompt_id"], len(r["points"])) for w, r in runs.items()} == {"wf-basic": ("a", 2),
                                                                                 "wf-continue": ("b", 1)}
    assert [r["prompt_id"] for r in history.snapshot(workflow="wf-basic")["runs"]] == ["a"]
    assert {d["workflow"] for e, d in rec.events} == {"wf-basic"}


def test_workflow_id_comes_from_the_frontends_extra_pnginfo():
    assert workflow_id({"workflow": {"id": "6f1c2a52-0001", "nodes": []}}) == "6f1c2a52-0001"
    assert workflow_id(None) == workflow_id({}) == workflow_id({"workflow": "odd"}) == ""  # API prompts


# --- previews and checkpoints ------------------------------------------------------------------


def test_sample_and_checkpoint_paths_are_relative_to_the_output_directory(tmp_path):
    out = tmp_path / "output"
    sink, rec = make_sink(output_dir=str(out))
    sink.started(10, 0)
    sink.sample(4, str(out / "loralab_samples" / "sample_step00004.png"), image=None)
    sink.checkpoint(5, str(out / "loras" / "ck_00005.safetensors"), "interrupted", "Interrupted at step 5")
    (sample,) = rec.of(SAMPLE)
    assert sample == {"node": "7", "prompt_id": "p1", "workflow": "", "step": 4,
                      "image": {"filename": "sample_step00004.png", "subfolder": "loralab_samples", "type": "output"}}
    (ck,) = rec.of(CHECKPOINT)
    assert ck == {"node": "7", "prompt_id": "p1", "workflow": "", "step": 5, "reason": "interrupted",
                  "path": "loras/ck_00005.safetensors", "message": "Interrupted at step 5"}
    (run,) = sink.history.snapshot()["runs"]
    assert run["samples"] == [{k: v for k, v in sample.items() if k not in ("node", "prompt_id", "workflow")}]
    assert run["checkpoints"][0]["path"] == "loras/ck_00005.safetensors"


def test_a_preview_outside_the_output_directory_is_not_sent(tmp_path):
    sink, rec = make_sink(output_dir=str(tmp_path / "output"))
    sink.started(10, 0)
    sink.sample(1, str(tmp_path / "elsewhere" / "x.png"), image=None)
    sink.sample(2, str(tmp_path / "output_other" / "y.png"), image=None)  # a sibling with a common prefix
    assert rec.of(SAMPLE) == []


# --- without a server --------------------------------------------------------------------------


def test_without_comfyuis_server_nothing_is_sent_and_no_route_is_added(monkeypatch):
    monkeypatch.delitem(sys.modules, "server", raising=False)
    assert send_to_browser(PROGRESS, {"x": 1}) is False
    assert register_routes() is False
    history = RunHistory()
    sink = LiveTrainingEvents("9", "p", history=history)  # the default sender
    run_steps(sink, FakeClock(), [0.2, 0.1], 1.0)
    sink.finished("finished")
    assert [p[0] for p in history.snapshot("9")["runs"][0]["points"]] == [1, 2]


def test_history_snapshot_builds_its_json_outside_the_lock_from_a_stable_copy(monkeypatch):
    """Training takes the lock at every step: building a long run's points under it would stall
    training for as long as a page (re)load asks for the history."""
    history = RunHistory()
    clock = FakeClock()
    sink, _ = make_sink(clock=clock, history=history)
    run_steps(sink, clock, [0.5, 0.4, 0.3], 1.0)
    built_under_lock = []
    original = LiveRun.to_json

    def to_json(run):
        built_under_lock.append(history.lock.locked())
        if not built_under_lock[-1]:  # training goes on meanwhile (under the lock it would deadlock)
            sink.step(StepReport(4, 4, 0.2, 1.0, lr=1e-3, completed=4))
        return original(run)

    monkeypatch.setattr(LiveRun, "to_json", to_json)
    (run,) = history.snapshot()["runs"]
    assert built_under_lock == [False]
    assert [p[0] for p in run["points"]] == [1, 2, 3]  # the copy taken at the call, not the later step
