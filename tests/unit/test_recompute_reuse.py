"""reuse_in_recompute: a checkpointed piece's recompute gets back what its forward computed."""
import torch
import torch.utils.checkpoint

from loralab.sampler.checkpointing import _with_results, reuse_in_recompute


class Expensive(torch.autograd.Function):
    """x * 3, whose forward result is asked for through reuse_in_recompute; counts its forwards."""
    runs = 0

    @staticmethod
    def forward(ctx, x):
        def compute():
            Expensive.runs += 1
            return x * 3
        out = reuse_in_recompute(compute)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad * 3 + 0 * out


def piece(x):
    return (Expensive.apply(x.sin()) * x).cos()


def _grad(run):
    x = torch.linspace(-1, 1, 12, requires_grad=True)
    Expensive.runs = 0
    run(x).sum().backward()
    return x.grad, Expensive.runs


def test_a_checkpointed_piece_computes_once_and_gets_the_same_gradient():
    reference, plain_runs = _grad(piece)
    got, checkpointed_runs = _grad(lambda x: torch.utils.checkpoint.checkpoint(
        _with_results(piece), x, use_reentrant=False))
    torch.testing.assert_close(got, reference)
    assert plain_runs == 1
    assert checkpointed_runs == 1  # the recompute reused the forward's result


def test_outside_a_checkpointed_piece_it_always_computes():
    _, runs = _grad(lambda x: torch.utils.checkpoint.checkpoint(piece, x, use_reentrant=False))
    assert runs == 2  # plain checkpointing: the forward, then the recompute
