"""Live training events for the browser: the TrainLora node's loss chart, progress line, previews
and checkpoint messages.

``LiveTrainingEvents`` is the sink the node hands to ``train_lora``. It keeps each run in
``HISTORY`` (so a page reloaded mid-run can ask ``GET /loralab/history`` for what it missed) and
forwards it over ComfyUI's websocket as ``loralab.*`` events. ComfyUI's ``server`` module is never
imported here: when it is not loaded (tests, scripts running the pack in-process) the sink only
records history.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from array import array
from collections import OrderedDict, deque
from typing import Callable

from ..sampler.run_outputs import TrainingEvents
from .loss_plot import smooth_losses

log = logging.getLogger("loralab")

PROGRESS, SAMPLE, CHECKPOINT, STATUS = "loralab.progress", "loralab.sample", "loralab.checkpoint", "loralab.status"
HISTORY_ROUTE = "/loralab/history"
SMOOTHING = 0.9  # smooth_losses' default weight: the live chart and the Loss Graph PNG draw the same curve
MIN_INTERVAL_S = 0.3  # at most one progress message per this many seconds (first and last step always)
SPEED_WINDOW = 20  # s/step is the wall time of the last this many steps (previews and saves included)
MAX_RUNS = 8  # runs kept in memory: the latest of each node, oldest node dropped first
MAX_SAMPLES = 8  # preview images remembered per run
MAX_CHECKPOINTS = 20  # checkpoint messages remembered per run


def finite_or_none(value) -> float | None:
    """JSON has no NaN/inf (the browser's JSON.parse rejects them): a diverged loss becomes null."""
    value = float(value)
    return value if math.isfinite(value) else None


class RunningSmoother:
    """``smooth_losses`` one value at a time, for a run whose losses arrive step by step.

    Recomputing ``smooth_losses`` over the whole run at every step would cost O(steps²); this
    keeps its state instead and returns exactly the value ``smooth_losses(all_so_far)[-1]`` would
    (the unit tests compare the two).
    """

    def __init__(self, weight: float = SMOOTHING):
        smooth_losses([], weight)  # the same validation of weight
        self.weight, self.ema, self.count = weight, 0.0, 0

    def add(self, value: float) -> float:
        value = float(value)
        if not math.isfinite(value):
            return value
        self.count += 1
        self.ema = self.ema * self.weight + (1.0 - self.weight) * value
        return self.ema / (1.0 - self.weight**self.count)


class Throttle:
    """When a progress message goes out: always for the first and the last step, otherwise when at
    least ``interval`` seconds passed since the previous one. Points between messages are batched,
    so a fast run sends few messages and loses no point."""

    def __init__(self, interval: float = MIN_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.interval, self.clock, self.last = interval, clock, None

    def due(self, step: int, total: int) -> bool:
        now = self.clock()
        if self.last is None or step >= total or now - self.last >= self.interval:
            self.last = now
            return True
        return False


class LiveRun:
    """One run of one node as the browser sees it. Points are kept as compact arrays: a 100k-step
    run costs a few MB, not a list of Python tuples."""

    def __init__(self, node: str, prompt_id: str, total: int, completed: int, workflow: str = ""):
        self.node, self.prompt_id, self.total, self.workflow = node, prompt_id, total, workflow
        self.status = "running"
        self.step, self.global_step = 0, completed
        self.loss = self.smoothed = self.lr = self.s_per_step = self.eta_s = None
        self.steps, self.losses, self.smooths = array("q"), array("d"), array("d")
        self.samples: deque = deque(maxlen=MAX_SAMPLES)
        self.checkpoints: deque = deque(maxlen=MAX_CHECKPOINTS)

    def points(self, start: int = 0) -> list[list]:
        """[[global_step, loss, smoothed], ...] from the ``start``-th point on."""
        return [[s, finite_or_none(l), finite_or_none(m)]
                for s, l, m in zip(self.steps[start:], self.losses[start:], self.smooths[start:])]

    def copy(self) -> "LiveRun":
        """A copy that later steps do not change (the arrays copied: fast, even for 100k points)."""
        other = LiveRun.__new__(LiveRun)
        other.__dict__.update(self.__dict__)
        other.steps, other.losses, other.smooths = self.steps[:], self.losses[:], self.smooths[:]
        other.samples, other.checkpoints = deque(self.samples), deque(self.checkpoints)
        return other

    def to_json(self) -> dict:
        return {"node": self.node, "prompt_id": self.prompt_id, "workflow": self.workflow, "status": self.status,
                "total": self.total,
                "step": self.step, "global_step": self.global_step, "loss": self.loss, "smoothed": self.smoothed,
                "lr": self.lr, "s_per_step": self.s_per_step, "eta_s": self.eta_s, "points": self.points(),
                "samples": list(self.samples), "checkpoints": list(self.checkpoints)}


class RunHistory:
    """The latest run of each node of each workflow, at most ``max_runs`` of them; shared by the
    training thread (writes) and the server's event loop (reads), hence the lock. Node ids repeat
    across workflows (every template has a node 5), so a run is keyed by its workflow's id too."""

    def __init__(self, max_runs: int = MAX_RUNS):
        self.max_runs = max_runs
        self.lock = threading.Lock()
        self._runs: OrderedDict[tuple[str, str], LiveRun] = OrderedDict()

    def begin(self, run: LiveRun) -> None:
        """``run`` replaces its node's previous run; the least recently started node goes first."""
        key = (run.workflow, run.node)
        with self.lock:
            self._runs.pop(key, None)
            self._runs[key] = run
            while len(self._runs) > self.max_runs:
                self._runs.popitem(last=False)

    def snapshot(self, node: str | None = None, workflow: str | None = None) -> dict:
        """The body of GET /loralab/history (``node`` and ``workflow`` filter the runs). The lock is
        held only to copy the runs: turning 100k-point runs into JSON takes seconds, and training
        must not wait for that at its next step."""
        with self.lock:
            runs = [r.copy() for r in self._runs.values()
                    if (node is None or r.node == node) and (workflow is None or r.workflow == workflow)]
        return {"runs": [r.to_json() for r in runs]}

    def clear(self) -> None:
        with self.lock:
            self._runs.clear()


HISTORY = RunHistory()


def workflow_id(extra_pnginfo) -> str:
    """The id the frontend gave the workflow a prompt was queued from ('' for an API prompt
    without one): ComfyUI's extra_pnginfo carries the workflow, whose top-level id is that id."""
    workflow = extra_pnginfo.get("workflow") if isinstance(extra_pnginfo, dict) else None
    value = workflow.get("id") if isinstance(workflow, dict) else None
    return str(value) if isinstance(value, (str, int)) else ""


def _prompt_server():
    """ComfyUI's PromptServer instance if this process runs ComfyUI's server, else None."""
    server = sys.modules.get("server")
    return getattr(getattr(server, "PromptServer", None), "instance", None)


def send_to_browser(event: str, data: dict) -> bool:
    """Broadcasts ``event`` to every connected browser; False when there is no server to send to."""
    instance = _prompt_server()
    if instance is None:
        return False
    instance.send_sync(event, data)
    return True


def _executing(field: str) -> str:
    """A field of the execution ComfyUI is running on this thread ('' outside an execution)."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return ""
    context = get_executing_context()
    return str(getattr(context, field)) if context is not None else ""


def running_prompt_id() -> str:
    """The id of the prompt ComfyUI is executing on this thread ('' outside an execution)."""
    return _executing("prompt_id")


def _running_node_id() -> str:
    return _executing("node_id")


class LiveTrainingEvents(TrainingEvents):
    """Records a run in ``history`` and forwards it to the browser (see the module docstring)."""

    def __init__(self, node: str, prompt_id: str, output_dir: str | None = None, *,
                 send: Callable[[str, dict], object] = send_to_browser, clock: Callable[[], float] = time.monotonic,
                 history: RunHistory = HISTORY, interval: float = MIN_INTERVAL_S, workflow: str = ""):
        self.node, self.prompt_id, self.output_dir, self.workflow = str(node), str(prompt_id), output_dir, str(workflow)
        self._send, self.clock, self.history, self.interval = send, clock, history, interval
        self.run: LiveRun | None = None
        self._send_failed = False

    @classmethod
    def for_running_node(cls, unique_id, output_dir: str | None, extra_pnginfo=None) -> "LiveTrainingEvents":
        """The sink of the node ComfyUI is executing now, named as the browser names it: its node
        id, and the id of the workflow it was queued from (in ``extra_pnginfo``, '' without one)."""
        node = unique_id if unique_id is not None else _running_node_id()
        return cls(str(node), running_prompt_id(), output_dir, workflow=workflow_id(extra_pnginfo))

    # --- TrainingEvents -------------------------------------------------------------------------

    def started(self, total: int, completed: int) -> None:
        self.run = LiveRun(self.node, self.prompt_id, total, completed, self.workflow)
        self.history.begin(self.run)
        self._smoother = RunningSmoother()
        self._throttle = Throttle(self.interval, self.clock)
        self._sent = 0  # points already in a progress message
        self._times = deque([(0, self.clock())], maxlen=SPEED_WINDOW + 1)
        self._status("running")

    def step(self, report) -> None:
        run = self._current(report.total, report.completed - report.step)
        smoothed = self._smoother.add(report.loss)
        self._times.append((report.step, self.clock()))
        (first_step, first_t), (last_step, last_t) = self._times[0], self._times[-1]
        with self.history.lock:
            run.steps.append(int(report.completed))
            run.losses.append(float(report.loss))
            run.smooths.append(float(smoothed))
            run.step, run.total, run.global_step = report.step, report.total, report.completed
            run.loss, run.smoothed, run.lr = finite_or_none(report.loss), finite_or_none(smoothed), float(report.lr)
            run.s_per_step = (last_t - first_t) / (last_step - first_step) if last_step > first_step else report.seconds
            run.eta_s = run.s_per_step * max(0, report.total - report.step)
        if self._throttle.due(report.step, report.total):
            self._progress()

    def sample(self, step: int, path: str, image) -> None:
        rel = self._relative(path)
        if rel is None:
            log.warning("LoRA Lab: preview %s is outside the output directory; the browser cannot show it", path)
            return
        entry = {"step": int(step), "image": {"filename": os.path.basename(rel), "subfolder": os.path.dirname(rel),
                                              "type": "output"}}
        run = self._current()
        with self.history.lock:
            run.samples.append(entry)
        self._emit(SAMPLE, {**self._ids(), **entry})

    def checkpoint(self, step: int, path: str, reason: str, message: str) -> None:
        rel = self._relative(path)
        entry = {"step": int(step), "reason": reason, "path": rel if rel is not None else str(path),
                 "message": message}
        run = self._current()
        with self.history.lock:
            run.checkpoints.append(entry)
        self._emit(CHECKPOINT, {**self._ids(), **entry})

    def finished(self, status: str) -> None:
        run = self._current()
        if self._sent < len(run.steps):  # an interrupt or error between two throttled messages
            self._progress()
        with self.history.lock:
            run.status = status
            if status == "finished":
                run.eta_s = 0.0
        self._status(status)

    # --- helpers --------------------------------------------------------------------------------

    def _current(self, total: int = 0, completed: int = 0) -> LiveRun:
        """The run; a sink used without started() (a caller that skips it) starts one itself."""
        if self.run is None:
            self.started(total, completed)
        return self.run

    def _progress(self) -> None:
        run = self.run
        with self.history.lock:
            points = run.points(self._sent)
            self._sent = len(run.steps)
            data = {**self._ids(), "step": run.step, "total": run.total,
                    "global_step": run.global_step, "loss": run.loss, "smoothed": run.smoothed, "lr": run.lr,
                    "s_per_step": run.s_per_step, "eta_s": run.eta_s, "points": points}
        self._emit(PROGRESS, data)

    def _status(self, status: str) -> None:
        self._emit(STATUS, {**self._ids(), "status": status})

    def _ids(self) -> dict:
        """What names the run in every event: node, prompt and workflow."""
        return {"node": self.node, "prompt_id": self.prompt_id, "workflow": self.workflow}

    def _emit(self, event: str, data: dict) -> None:
        """Sends; a failing socket never stops training (logged once per run)."""
        try:
            self._send(event, data)
        except Exception as e:  # noqa: BLE001 - the UI is optional, the run is not
            if not self._send_failed:
                self._send_failed = True
                log.warning("LoRA Lab: could not send %s to the browser: %s", event, e)

    def _relative(self, path: str) -> str | None:
        """``path`` relative to the output directory (as /view wants it), None if it lies outside."""
        if not self.output_dir:
            return None
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(self.output_dir))
        if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
            return None
        return rel.replace(os.sep, "/")


async def _history_handler(request):
    """GET /loralab/history, built and encoded off the event loop: long runs make it megabytes of
    JSON, and the server must keep answering (and sending progress) meanwhile."""
    import asyncio
    import json

    from aiohttp import web
    node, workflow = request.query.get("node"), request.query.get("workflow")
    body = await asyncio.get_running_loop().run_in_executor(None, lambda: json.dumps(HISTORY.snapshot(node, workflow)))
    return web.Response(text=body, content_type="application/json")


_routes_added = False


def register_routes() -> bool:
    """Adds GET /loralab/history to ComfyUI's server (once). Must run before the server adds its
    routes to the app, i.e. while custom nodes load; False when no server runs in this process."""
    global _routes_added
    if _routes_added:
        return True
    instance = _prompt_server()
    if instance is None:
        return False
    instance.routes.get(HISTORY_ROUTE)(_history_handler)
    _routes_added = True
    return True
