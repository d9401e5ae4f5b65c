"""Dynamic loss scaling for fp16 training.

fp16 keeps 5 exponent bits: in its backward, activation gradients under ~6e-8 flush to zero and
large ones overflow. The loss is multiplied by a large scale before the backward and the gradients
divided by it before the optimizer step. A step whose gradients came out inf or NaN is skipped and
the scale halved; after ``GROWTH_INTERVAL`` clean steps in a row the scale doubles again.

torch's GradScaler does the same, but refuses fp16 parameters (lora_dtype fp16) with an optimizer
that has no fused kernel, and keeps its state where a resumed run cannot reach it. This one works
for parameters of any dtype and its state goes into the run's ``.trainstate``.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("loralab")

INITIAL_SCALE = 2.0 ** 16
GROWTH_INTERVAL = 2000


class LossScaler:
    """Scales the loss while ``enabled`` (fp16 compute); a no-op pass-through otherwise."""

    def __init__(self, enabled: bool, scale: float = INITIAL_SCALE, growth_interval: int = GROWTH_INTERVAL):
        self.enabled = enabled
        self.scale = scale
        self.growth_interval = growth_interval
        self.clean_steps = 0  # steps since the scale last changed
        self.skipped = 0  # steps of this run skipped for inf/NaN gradients

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale(self, parameters: list[torch.Tensor]) -> bool:
        """Divides the gradients by the scale (before clipping or the optimizer reads them);
        returns whether they are all finite. Always True while disabled: nothing to check."""
        return True if not self.enabled else self._unscale(parameters)

    def update(self, finite: bool) -> None:
        """After a step: a skipped one (``finite`` False) halves the scale; ``growth_interval``
        clean ones in a row double it."""
        if not self.enabled:
            return
        if not finite:
            self.skipped += 1
            self.scale /= 2.0
            self.clean_steps = 0
            log.info("LoRA Lab: fp16 gradients overflowed; step skipped, loss scale lowered to %g", self.scale)
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= 2.0
            self.clean_steps = 0

    def _unscale(self, parameters: list[torch.Tensor]) -> bool:
        """Divides every gradient by the scale in place; False if any holds inf or NaN."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for p in parameters:
            if p.grad is not None:
                by_device.setdefault(p.grad.device, []).append(p.grad)
        finite = True
        for device, grads in by_device.items():
            found = torch.zeros(1, device=device)
            inverse = torch.full((1,), 1.0 / self.scale, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inverse)
            finite = finite and not bool(found.item())
        return finite

    def state(self) -> dict[str, float]:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
