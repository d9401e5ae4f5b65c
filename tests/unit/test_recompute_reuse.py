"""reuse_in_recompute: a checkpointed piece's recompute gets back what its forward computed, for the
results worth keeping at the piece's exchange rate of bytes per FLOP."""
import pytest
import torch
import torch.utils.checkpoint

from loralab.sampler.frozen_layers import frozen_forward
from loralab.sampler.recompute_reuse import reuse_in_recompute, with_kept_results


class Expensive(torch.autograd.Function):
    """x * 3, asked for through reuse_in_recompute as costing ``FLOPS`` FLOPs; counts its forwards."""
    runs = 0
    FLOPS = 1_000_000

    @staticmethod
    def forward(ctx, x):
        def compute():
            Expensive.runs += 1
            return x * 3
        out = reuse_in_recompute(compute, Expensive.FLOPS, x.numel() * x.element_size())
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad * 3 + 0 * out


def piece(x):
    return (Expensive.apply(x.sin()) * x).cos()


def _grad(run):
    x = torch.linspace(-1, 1, 12, requires_grad=True)  # 48 bytes
    Expensive.runs = 0
    run(x).sum().backward()
    return x.grad, Expensive.runs


def _checkpointed(keep_below):
    return lambda x: torch.utils.checkpoint.checkpoint(with_kept_results(piece, keep_below), x, use_reentrant=False)


def test_a_result_worth_keeping_is_computed_once_with_the_same_gradient():
    reference, plain_runs = _grad(piece)
    got, checkpointed_runs = _grad(_checkpointed(keep_below=1e-3))  # 48 bytes < 1e-3 * 1e6 FLOPs
    torch.testing.assert_close(got, reference)
    assert plain_runs == 1
    assert checkpointed_runs == 1  # the recompute got the forward's result back


def test_a_result_too_large_for_its_cost_is_recomputed():
    reference, _ = _grad(piece)
    got, runs = _grad(_checkpointed(keep_below=1e-5))  # 48 bytes > 1e-5 * 1e6 FLOPs
    torch.testing.assert_close(got, reference)
    assert runs == 2


def test_outside_a_checkpointed_piece_it_always_computes():
    _, runs = _grad(lambda x: torch.utils.checkpoint.checkpoint(piece, x, use_reentrant=False))
    assert runs == 2  # plain checkpointing: the forward, then the recompute
    _, runs = _grad(_checkpointed(keep_below=None))  # a plan that has not measured keeps nothing
    assert runs == 2


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_frozen_layers_keep_their_output_for_the_recompute_when_it_is_worth_it(kind, monkeypatch):
    """A frozen layer inside a checkpointed piece, whose output a norm keeps for the backward: with
    a generous exchange rate its product runs once a step, with a strict one twice."""
    from loralab.sampler import frozen_layers
    layer = (torch.nn.Linear(64, 16) if kind == "linear" else torch.nn.Conv2d(16, 8, 3, padding=1)).requires_grad_(False)
    norm = torch.nn.LayerNorm(16) if kind == "linear" else torch.nn.GroupNorm(4, 8)
    forward = frozen_forward(layer)
    runs = []
    real = frozen_layers._matmul if kind == "linear" else frozen_layers._conv
    name = "_matmul" if kind == "linear" else "_conv"
    monkeypatch.setattr(frozen_layers, name, lambda *a: runs.append(1) or real(*a))

    def piece(x):
        return norm(forward(layer, x.sin()))

    x = torch.randn((4, 64) if kind == "linear" else (1, 16, 6, 6), requires_grad=True)
    grads = []
    for keep_below in (1.0, 1e-9):
        runs.clear()
        x.grad = None
        torch.utils.checkpoint.checkpoint(with_kept_results(piece, keep_below), x, use_reentrant=False).sum().backward()
        grads.append(x.grad.clone())
        # the forward, the recompute unless kept, and for a Linear the backward's input gradient
        once = 2 if kind == "linear" else 1
        assert len(runs) == (once if keep_below == 1.0 else once + 1)
    torch.testing.assert_close(grads[0], grads[1])


class Cheap(torch.autograd.Function):
    """x * 3 whose backward needs no saved output, so the piece may add to it in place."""
    runs = 0

    @staticmethod
    def forward(ctx, x):
        def compute():
            Cheap.runs += 1
            return x * 3
        return reuse_in_recompute(compute, Expensive.FLOPS, x.numel() * x.element_size())

    @staticmethod
    def backward(ctx, grad):
        return grad * 3


def modifying_piece(x):
    y = Cheap.apply(x.sin())
    y += x  # in place on the result the forward kept
    return (y * x).cos()


def test_a_kept_result_the_piece_modifies_in_place_is_computed_again():
    """Handing back the kept tensor would give the recompute x*3 + x where it needs x*3, a wrong
    gradient with no error: the version counter shows the change."""
    x = torch.linspace(-1, 1, 12, requires_grad=True)
    modifying_piece(x).sum().backward()
    reference = x.grad.clone()
    x.grad = None
    Cheap.runs = 0
    torch.utils.checkpoint.checkpoint(with_kept_results(modifying_piece, 1e-3), x, use_reentrant=False).sum().backward()
    torch.testing.assert_close(x.grad, reference)
    assert Cheap.runs == 2
