"""Measuring checkpoint pieces: the activation bytes each keeps for backward, the FLOPs its recompute
runs, and which pieces are worth checkpointing."""
import pytest
import torch

from loralab.sampler.checkpoint_plan import PieceCost, PieceMeter, choose_pieces


class MemoryHeavy(torch.nn.Module):
    """Cheap elementwise work that keeps two [n, 64] tensors for backward (sin keeps its input,
    and the product keeps both factors, one of them sin's input again)."""

    def forward(self, x):
        h = x * 2.0
        return h.sin() * h.cos()


class ComputeHeavy(torch.nn.Module):
    """A big frozen-input matmul whose backward needs only the small weight: keeps ``x`` (its
    input, which is not counted) and nothing else."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(64, 64))

    def forward(self, x):
        return x @ self.weight


def _measure(pieces: dict[str, torch.nn.Module], x: torch.Tensor):
    meter = PieceMeter()

    def forward():
        h = x
        for name, piece in pieces.items():
            h = meter.run(name, piece, (h,), {})
        return h

    return meter.measure(forward)


def test_each_piece_gets_its_saved_bytes_and_recompute_flops():
    x = torch.randn(32, 64, requires_grad=True)
    costs = _measure({"heavy memory": MemoryHeavy(), "heavy compute": ComputeHeavy()}, x)
    one = 32 * 64 * 4
    # h (kept by sin, cos and the product: counted once), sin(h) and cos(h) for the product
    assert costs["heavy memory"].saved_bytes == 3 * one
    assert costs["heavy memory"].recompute_flops == 0  # elementwise: no counted FLOPs
    # its input is the previous piece's output: not counted; the parameter is not counted either
    assert costs["heavy compute"].saved_bytes == 0
    assert costs["heavy compute"].recompute_flops == 0  # saves nothing: its recompute would stop at once


def test_recompute_flops_stop_at_the_last_saved_tensor():
    """A frozen layer at the end of a piece saves nothing, so the recompute never reaches it."""
    from loralab.sampler.frozen_layers import frozen_forward

    class MatmulSinFrozen(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first = torch.nn.Parameter(torch.randn(64, 64))
            self.tail = torch.nn.Linear(64, 32).requires_grad_(False)

        def forward(self, x):
            h = (x @ self.first).sin()  # sin keeps the matmul's output: the last saved tensor
            return frozen_forward(self.tail)(self.tail, h)

    x = torch.randn(16, 64, requires_grad=True)
    costs = _measure({"piece": MatmulSinFrozen()}, x)
    assert costs["piece"].saved_bytes == 16 * 64 * 4
    assert costs["piece"].recompute_flops == 2 * 16 * 64 * 64  # the first matmul only, not the tail


def test_the_measuring_forward_keeps_no_activation_alive():
    """It runs with grad enabled, but what it would save is dropped at once."""
    big = torch.randn(256, 1024, requires_grad=True)
    meter = PieceMeter()
    kept = []

    def forward():
        out = meter.run("piece", lambda t: (t * 2).sin().cos(), (big,), {})
        kept.append(out)
        return out

    costs = meter.measure(forward)
    assert costs["piece"].saved_bytes == 2 * big.numel() * 4
    # the graph holds no saved tensor: asking for one fails instead of returning it
    node = kept[0].grad_fn
    try:
        node._saved_self
    except RuntimeError:
        pass
    else:
        raise AssertionError("a saved tensor of the measuring forward was kept")


def test_choose_pieces_keeps_the_dense_ones():
    costs = {
        "transformer": PieceCost(saved_bytes=40_000_000, recompute_flops=6_000_000_000),  # 6.7e-3 B/FLOP
        "transformer, smaller": PieceCost(saved_bytes=20_000_000, recompute_flops=4_600_000_000),  # 4.3e-3
        "resblock": PieceCost(saved_bytes=5_000_000, recompute_flops=3_800_000_000),  # 1.3e-3
        "upsample": PieceCost(saved_bytes=0, recompute_flops=0),
    }
    assert choose_pieces(costs) == {"transformer", "transformer, smaller"}
    assert choose_pieces(costs, share=0.1) == {"transformer", "transformer, smaller", "resblock"}
    alike = {f"block {i}": PieceCost(saved_bytes=10_000_000 + i, recompute_flops=4_000_000_000) for i in range(4)}
    assert choose_pieces(alike) == set(alike)  # a model of like blocks checkpoints all of them
    assert choose_pieces({}) == set()


@pytest.mark.parametrize("probe_chose_winograd", [True, False], ids=["probe chose Winograd", "probe chose direct"])
def test_a_frozen_conv_is_priced_as_the_direct_conv_whatever_its_probe_chose(probe_chose_winograd, monkeypatch):
    """Training runs a frozen 3x3 conv by Winograd where a timing probe found that faster. The plan
    counts the direct conv's FLOPs either way, so that it does not change with the probe from one
    process to the next; training's own calls still follow the probe."""
    from loralab.sampler import winograd
    from loralab.sampler.frozen_layers import frozen_forward

    monkeypatch.setattr(winograd, "winograd_is_faster", lambda *geometry: probe_chose_winograd)
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    calls = []
    real_conv = winograd.winograd_conv
    monkeypatch.setattr(winograd, "winograd_conv", lambda *a, **k: calls.append(1) or real_conv(*a, **k))

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False).requires_grad_(False)
    conv_forward = frozen_forward(conv)

    class ConvSin(torch.nn.Module):
        def forward(self, x):
            return conv_forward(conv, x).sin()  # sin keeps the conv's output: the recompute runs the conv

    x = torch.randn(1, 8, 32, 32, requires_grad=True)
    costs = _measure({"piece": ConvSin()}, x)
    assert costs["piece"].recompute_flops == 2 * (8 * 3 * 3) * 8 * (32 * 32)  # one MAC per tap, channel, position
    assert costs["piece"].saved_bytes == 8 * 32 * 32 * 4
    assert calls == []

    out = ConvSin()(x)
    assert calls == ([1] if probe_chose_winograd else [])
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, conv.weight, padding=1).sin(), rtol=1e-4, atol=1e-4)
