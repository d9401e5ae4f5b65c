"""TrainSampler: the gradient-step loop.

Each optimizer step draws ``grad_accumulation_steps`` micro-batches; each is noised at random
sigmas, denoised by the model (with the adapters attached to its patcher), and its loss in the
model's prediction space is back-propagated, divided by the number of micro-batches so the
accumulated gradient equals that of one large batch. Randomness comes from one seeded generator,
so a run is reproducible from (seed, step).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

import comfy.model_management

from .loss_scaling import LossScaler
from .objective import loss_function, model_loss, sample_sigmas
from . import train_state
from .optimizers import make_optimizer
from .schedules import check_schedule, lr_factor
from .training_set import TrainingSet

log = logging.getLogger("loralab")


@dataclass
class TrainConfig:
    steps: int = 16
    batch_size: int = 1
    grad_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    optimizer: str = "AdamW"
    loss_function: str = "MSE"
    seed: int = 0
    compute_dtype: torch.dtype = torch.float32  # the model's; fp16 turns on loss scaling
    lr_scheduler: str = "constant"  # see schedules.SCHEDULERS
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1  # cosine_with_restarts
    lr_scheduler_power: float = 1.0  # polynomial
    max_grad_norm: float = 0.0  # clip the adapter's gradient norm to this before each step; 0 = off


@dataclass
class StepReport:
    step: int  # 1-based, within this run
    total: int
    loss: float
    seconds: float
    lr: float = 0.0
    completed: int = 0  # optimizer steps done in total, including those of a restored state


class TrainingDiverged(ValueError):
    """The adapter's weights became NaN or infinite: a run to stop before anything is saved."""


class TrainSampler:
    """Runs ``config.steps`` optimizer steps of the adapter parameters on a loaded model patcher."""

    def __init__(self, model_patcher, named_parameters, training_set: TrainingSet, config: TrainConfig,
                 on_step: Callable[[StepReport], None] | None = None):
        self.patcher = model_patcher
        named = [(n, p) for n, p in named_parameters if p.requires_grad]
        if not named:
            raise ValueError("nothing to train: the adapter has no trainable parameters")
        self.names = [n for n, _ in named]
        self.parameters = [p for _, p in named]
        self.completed_steps = 0  # optimizer steps taken, including those of a restored state
        self.losses: list[float] = []  # of this run's completed steps
        self.data = training_set
        self.config = config
        self.on_step = on_step
        self.loss_fn = loss_function(config.loss_function)
        check_schedule(config.lr_scheduler, config.lr_warmup_steps, config.lr_scheduler_num_cycles,
                       config.lr_scheduler_power)
        if not config.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be 0 (off) or positive, got {config.max_grad_norm}")
        self.schedule_total = config.steps  # steps of the whole schedule; run() adds those done before
        self.optimizer = make_optimizer(config.optimizer, self.parameters, config.learning_rate)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.device = model_patcher.load_device
        self.scaler = LossScaler(enabled=config.compute_dtype == torch.float16)

    def draw(self):
        """The next micro-batch: (x0, conds, noise, sigma), all from the seeded generator."""
        sampling = self.patcher.model.model_sampling
        x0, conds = self.data.draw(self.config.batch_size, self.generator)
        noise = torch.randn(x0.shape, generator=self.generator, dtype=torch.float32).to(x0.device, x0.dtype)
        sigma = sample_sigmas(sampling, torch.rand(x0.shape[0], generator=self.generator)).to(x0.device)
        return x0, conds, noise, sigma

    def probe_forward(self) -> torch.Tensor:
        """One forward as training runs it, on the first item of the largest bucket, with no noise
        and leaving the random stream untouched (gradient checkpointing measures its pieces on it)."""
        bucket = max(self.data.buckets, key=lambda b: b.latents[0].numel())
        x0, conds = bucket.select(torch.tensor([0]))
        sigma = sample_sigmas(self.patcher.model.model_sampling, torch.tensor([0.5])).to(x0.device)
        return model_loss(self.patcher, x0, conds, torch.zeros_like(x0), sigma, self.loss_fn)

    def _micro_batch_loss(self) -> torch.Tensor:
        x0, conds, noise, sigma = self.draw()
        return model_loss(self.patcher, x0, conds, noise, sigma, self.loss_fn)

    def step(self) -> float:
        """One optimizer step over the accumulated micro-batches; returns their mean loss."""
        accumulate = self.config.grad_accumulation_steps
        total = torch.zeros((), dtype=torch.float32)
        for _ in range(accumulate):
            comfy.model_management.throw_exception_if_processing_interrupted()
            loss = self._micro_batch_loss()
            self.scaler.scale_loss(loss / accumulate).backward()
            total += loss.detach().float().cpu()
        self._set_learning_rate()
        finite = self.scaler.unscale(self.parameters)
        if finite:
            if self.config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
            self.optimizer.step()
        self.scaler.update(finite)
        self.optimizer.zero_grad(set_to_none=True)
        return float(total) / accumulate

    def _set_learning_rate(self) -> None:
        """The scheduled rate of the step after ``completed_steps`` (a global step: a resumed run
        goes on along the same curve)."""
        c = self.config
        factor = lr_factor(self.completed_steps, self.schedule_total, c.lr_scheduler, c.lr_warmup_steps,
                           c.lr_scheduler_num_cycles, c.lr_scheduler_power)
        for group in self.optimizer.param_groups:
            group["lr"] = c.learning_rate * factor

    def capture_state(self, fingerprint: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Everything needed to continue exactly where this run stands (see train_state)."""
        orders = [list(b.order) for b in self.data.buckets]
        return train_state.capture(self.optimizer, self.names, self.generator, orders, self.completed_steps, fingerprint,
                                   self.scaler.state() if self.scaler.enabled else None)

    def restore_state(self, state) -> None:
        """Continues from a captured state: optimizer moments, RNG, data order and step count.

        The state's tensors are copied first: a file read while ComfyUI executes a node gives
        inference-mode tensors, which the optimizer could not update in place.
        """
        tensors, metadata = state
        with torch.inference_mode(False):
            tensors = {key: value.clone() for key, value in tensors.items()}
        step, orders, loss_scale = train_state.restore((tensors, metadata), self.optimizer, self.names, self.generator)
        self.completed_steps = step
        if loss_scale is not None and self.scaler.enabled:
            self.scaler.load_state(loss_scale)
        if self._orders_fit(orders):
            for bucket, order in zip(self.data.buckets, orders):
                bucket.order = list(order)
        else:
            log.warning("LoRA Lab: the images differ from those the training state was made on; continuing "
                        "with a fresh image order")

    def _orders_fit(self, orders: list[list[int]]) -> bool:
        """Whether saved data orders can continue on this run's buckets: as many buckets, and every
        saved index inside its bucket."""
        return len(orders) == len(self.data.buckets) and all(
            all(0 <= i < len(bucket) for i in order) for bucket, order in zip(self.data.buckets, orders))

    def _position(self) -> tuple[torch.Tensor, list[list[int]]]:
        """Where the random stream and the data order stand (cheap; taken before every step)."""
        return self.generator.get_state(), [list(b.order) for b in self.data.buckets]

    def _rewind(self, position) -> None:
        """Back to ``position`` and no accumulated gradient: the state after the last completed step."""
        rng, orders = position
        self.generator.set_state(rng)
        for bucket, order in zip(self.data.buckets, orders):
            bucket.order = order
        self.optimizer.zero_grad(set_to_none=True)

    def _weights_not_finite(self) -> bool:
        """After every step, before it is reported (and checkpointed): a step's loss comes from the
        weights before its update, so only the weights show that the update overflowed. A skipped
        fp16 step leaves them finite. One fused norm over all parameters, one host sync."""
        norms = torch._foreach_norm([p.detach() for p in self.parameters])
        return not bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())

    def run(self) -> list[float]:
        """All steps; returns the loss of each step. Raises ComfyUI's interrupt exception if stopped.

        An interrupt in the middle of a step (between accumulated micro-batches, which already drew
        from the RNG and the data order) rewinds to the start of that step, so ``capture_state``
        then describes the last completed step exactly and resuming from it repeats nothing.
        ``self.losses`` holds the losses of the completed steps either way.
        """
        self.losses = losses = []
        self.schedule_total = self.completed_steps + self.config.steps
        with torch.inference_mode(False), torch.enable_grad():
            for i in range(self.config.steps):
                start = time.perf_counter()
                position = self._position()
                try:
                    loss = self.step()
                except comfy.model_management.InterruptProcessingException:
                    self._rewind(position)
                    raise
                self.completed_steps += 1
                losses.append(loss)
                if self._weights_not_finite():
                    raise TrainingDiverged(
                        f"training diverged at step {self.completed_steps}: the loss is {loss:g} and the adapter "
                        "weights are no longer finite, so the run stops without saving them. Lower "
                        f"learning_rate (now {self.config.learning_rate:g}) or alpha, or set max_grad_norm")
                if self.on_step:
                    self.on_step(StepReport(i + 1, self.config.steps, loss, time.perf_counter() - start,
                                            lr=float(self.optimizer.param_groups[0]["lr"]),
                                            completed=self.completed_steps))
        return losses
