"""What a training run produces on the side, besides the adapter: live events, preview samples and
resumable checkpoints.

The node fills these in from its widgets; train_lora reads them. TrainingEvents is the one place
the sampler reports to: the node passes a subclass that forwards to the browser (report/live.py),
tests pass one that records. Every method is a no-op here, so a run without a UI costs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SampleSettings:
    """Preview images every ``every`` steps: ``positive`` (a CONDITIONING) sampled with ``seed`` at
    ``width`` x ``height`` in ``steps`` sampler steps, decoded by ``vae``, saved under the output
    directory as ``<prefix>_<RRRRR>_step<NNNNN>.png``: ``RRRRR`` numbers the run (ComfyUI's SaveImage
    counter, taken at run start), so runs sharing a prefix keep each other's previews."""
    every: int
    positive: list
    vae: object
    seed: int = 0
    width: int = 512
    height: int = 512
    steps: int = 20
    prefix: str = "loralab_samples/sample"


@dataclass
class CheckpointSettings:
    """Resumable checkpoints (adapter + ``.trainstate``) under ``output_dir``/``prefix``.

    ``every`` > 0 saves every that many steps and keeps the newest ``keep_last``; an interrupted run
    always saves one (``on_interrupt``), whatever ``every`` is.
    """
    output_dir: str
    prefix: str = "loras/loralab_checkpoint"
    every: int = 0
    keep_last: int = 3
    on_interrupt: bool = True
    key_style: str = "kohya"


class TrainingEvents:
    """Receives what a run reports. Subclass and override what you need."""

    def started(self, total: int, completed: int) -> None:
        """Before the first step: ``total`` steps in this run, ``completed`` already done before it."""

    def step(self, report) -> None:
        """After every optimizer step (a train_sampler.StepReport)."""

    def sample(self, step: int, path: str, image) -> None:
        """A preview was saved at ``path`` (absolute); ``image`` is the [1, H, W, 3] float tensor."""

    def checkpoint(self, step: int, path: str, reason: str, message: str) -> None:
        """A checkpoint was saved at ``path`` (absolute); ``reason`` is "periodic" or "interrupted"."""

    def finished(self, status: str) -> None:
        """The run ended: "finished", "interrupted" or "error"."""
