"""fp16 loss scaling: gradients too small for fp16 survive the backward, a step with inf/NaN
gradients is skipped and lowers the scale, clean steps raise it again, and unfused optimizers on
fp16 adapter weights stay finite."""
from __future__ import annotations

import math

import torch

from loralab.sampler.loss_scaling import LossScaler
from loralab.sampler.optimizers import make_optimizer


def _step(scaler: LossScaler, optimizer, parameters) -> bool:
    """What TrainSampler does after the backward: unscale, step only on finite gradients, update."""
    finite = scaler.unscale(parameters)
    if finite:
        optimizer.step()
    scaler.update(finite)
    return finite


def _fp16_backward(scaler: LossScaler, weight: torch.Tensor, x: torch.Tensor, factor: float) -> None:
    """A model that computes in fp16 on an fp32 master weight, with a loss whose gradient is tiny."""
    y = (x.half() * weight.half()).float().sum() * factor
    scaler.scale_loss(y).backward()


def test_scaled_backward_keeps_gradients_that_fp16_flushes_to_zero():
    x = torch.linspace(0.5, 2.0, 8)
    factor = 1e-9  # d loss / d y: below fp16's smallest subnormal (6e-8), so it underflows unscaled
    plain = torch.ones(8, requires_grad=True)
    _fp16_backward(LossScaler(enabled=False), plain, x, factor)
    assert torch.count_nonzero(plain.grad) == 0

    weight = torch.ones(8, requires_grad=True)
    scaler = LossScaler(enabled=True)
    optimizer = torch.optim.SGD([weight], lr=0.0)  # lr 0: the step leaves the weight, we read the grad
    _fp16_backward(scaler, weight, x, factor)
    assert _step(scaler, optimizer, [weight])
    torch.testing.assert_close(weight.grad, x.half().float() * factor, rtol=2e-3, atol=0)  # unscaled


def test_a_step_with_non_finite_gradients_is_skipped_and_halves_the_scale():
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = LossScaler(enabled=True, scale=1024.0)
    weight.grad = torch.tensor([1.0, math.inf, 0.0, 1.0])
    assert not _step(scaler, optimizer, [weight])
    assert torch.equal(weight.detach(), torch.ones(4)) and scaler.scale == 512.0 and scaler.skipped == 1

    weight.grad = torch.full((4,), 512.0)  # a clean step: unscaled to 1, SGD moves by lr
    assert _step(scaler, optimizer, [weight])
    torch.testing.assert_close(weight.detach(), torch.full((4,), 0.9))


def test_the_scale_doubles_after_the_growth_interval_of_clean_steps_and_its_state_round_trips():
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.0)
    scaler = LossScaler(enabled=True, scale=8.0, growth_interval=3)
    for expected in (8.0, 8.0, 16.0, 16.0, 16.0):
        weight.grad = torch.ones(2)
        _step(scaler, optimizer, [weight])
        assert scaler.scale == expected
    restored = LossScaler(enabled=True, growth_interval=3)
    restored.load_state(scaler.state())
    weight.grad = torch.ones(2)
    _step(restored, optimizer, [weight])  # the restored count of clean steps carries on: 2 -> 3 doubles
    assert restored.scale == 32.0
