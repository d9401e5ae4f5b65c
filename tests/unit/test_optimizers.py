"""Optimizers by name: torch's fused step where it has one, with the same updates as its loop."""
import pytest
import torch

from loralab.sampler.optimizers import OPTIMIZERS, make_optimizer


def _train(optimizer_factory, steps: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(8, 12), (12, 8), (16,)]]
    optimizer = optimizer_factory(params)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * (step + 1)
        optimizer.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_named_optimizer_updates_as_torchs_plain_loop_does(name):
    made = []
    got = _train(lambda params: made.append(make_optimizer(name, params, 1e-2)) or made[0])
    expected = _train(lambda params: OPTIMIZERS[name](params, lr=1e-2))
    assert type(made[0]) is OPTIMIZERS[name]
    assert made[0].defaults.get("fused") is (True if name != "RMSprop" else None)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(got[0], _train(lambda params: torch.optim.SGD(params, lr=0.0))[0])
