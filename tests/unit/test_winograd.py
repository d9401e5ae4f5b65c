"""Winograd F(2x2, 3x3) for frozen 3x3 convs: torch's conv and its input gradient, to fp32 rounding."""
import pytest
import torch
import torch.nn.functional as F

from loralab.sampler import winograd
from loralab.sampler.frozen_layers import frozen_forward
from loralab.sampler.winograd import (WinogradWeights, fits, kernel_transform, winograd_conv,
                                      winograd_input_grad)

GEOMETRIES = {
    "same padding": ((1, 8, 10, 10), 5, (1, 1)),
    "odd map": ((1, 6, 9, 7), 4, (1, 1)),
    "no padding, two images": ((2, 5, 8, 11), 7, (0, 0)),
    "padding 2 by 1": ((1, 4, 6, 9), 3, (2, 1)),
    "a single output row": ((1, 3, 3, 5), 2, (0, 1)),
}


def _reference(x, weight, bias, padding, grad):
    """conv2d in float64, and its input gradient by autograd."""
    x64 = x.double().requires_grad_(True)
    out = F.conv2d(x64, weight.double(), None if bias is None else bias.double(), padding=padding)
    out.backward(grad.double())
    return out.detach(), x64.grad


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_matches_the_convolution_and_its_input_gradient(name, with_bias):
    shape, out_channels, padding = GEOMETRIES[name]
    generator = torch.Generator().manual_seed(len(name))
    x = torch.randn(shape, generator=generator)
    weight = torch.randn(out_channels, shape[1], 3, 3, generator=generator)
    bias = torch.randn(out_channels, generator=generator) if with_bias else None
    expected_out_shape = F.conv2d(x, weight, padding=padding).shape
    grad = torch.randn(expected_out_shape, generator=generator)
    expected, expected_grad = _reference(x, weight, bias, padding, grad)

    u = kernel_transform(weight)
    out = winograd_conv(x, u, padding, bias)
    grad_in = winograd_input_grad(grad, u, padding)

    assert out.shape == expected_out_shape and out.is_contiguous()
    assert grad_in.shape == x.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_in.double(), expected_grad, rtol=1e-5, atol=1e-5)


def test_a_kernel_transform_is_exact_on_a_single_tap():
    """U of a kernel with one tap set to 1 is G's column for that tap (outer product): the transform
    constants themselves, checked against the definition U = G g G^T."""
    g = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
    for tap in range(9):
        weight = torch.zeros(1, 1, 3, 3)
        weight.view(-1)[tap] = 1.0
        expected = g @ weight[0, 0].double() @ g.T
        torch.testing.assert_close(kernel_transform(weight).view(4, 4).double(), expected)


@pytest.mark.parametrize("layer,expected", [
    (torch.nn.Conv2d(4, 4, 3, padding=1), True),
    (torch.nn.Conv2d(4, 4, 3), True),
    (torch.nn.Conv2d(4, 4, 3, padding=(2, 0)), True),
    (torch.nn.Conv2d(4, 4, 3, padding=3), False),
    (torch.nn.Conv2d(4, 4, 3, padding="same"), False),
    (torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), False),
    (torch.nn.Conv2d(4, 4, 3, stride=2, padding=1), False),
    (torch.nn.Conv2d(4, 4, 3, dilation=2, padding=2), False),
    (torch.nn.Conv2d(4, 4, 3, groups=2, padding=1), False),
    (torch.nn.Conv2d(4, 4, 1), False),
    (torch.nn.Conv2d(4, 4, (1, 3), padding=(0, 1)), False),
    (torch.nn.Conv1d(4, 4, 3, padding=1), False),
    (torch.nn.Linear(4, 4), False),
], ids=["3x3 same", "3x3 valid", "3x3 padding 2x0", "padding 3", "string padding", "reflect padding",
        "stride 2", "dilated", "grouped", "1x1", "1x3", "conv1d", "linear"])
def test_only_plain_3x3_convs_fit(layer, expected):
    assert fits(layer) is expected


class _Counted:
    """Counts calls of the module-level Winograd conv and input gradient."""

    def __init__(self, monkeypatch):
        self.conv = self.grad = 0
        real_conv, real_grad = winograd.winograd_conv, winograd.winograd_input_grad

        def conv(*args, **kwargs):
            self.conv += 1
            return real_conv(*args, **kwargs)

        def grad(*args, **kwargs):
            self.grad += 1
            return real_grad(*args, **kwargs)

        monkeypatch.setattr(winograd, "winograd_conv", conv)
        monkeypatch.setattr(winograd, "winograd_input_grad", grad)


def _frozen_conv(channels_in=6, channels_out=5, **kwargs):
    torch.manual_seed(0)
    return torch.nn.Conv2d(channels_in, channels_out, 3, **kwargs).requires_grad_(False)


def _run(forward, x, grad):
    """``forward(x)`` and the input gradient for ``grad``."""
    x = x.clone().requires_grad_(True)
    out = forward(x)
    out.backward(grad)
    return out.detach(), x.grad


def _run_frozen(layer, x, grad):
    return _run(lambda t: frozen_forward(layer)(layer, t), x, grad)


@pytest.mark.parametrize("shape", [(1, 6, 32, 32), (4, 6, 16, 16)], ids=["one 32x32 map", "four 16x16 maps"])
def test_a_frozen_conv_over_enough_positions_runs_winograd_and_matches(shape, monkeypatch):
    monkeypatch.setattr(winograd, "winograd_is_faster", lambda *geometry: True)
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    counted = _Counted(monkeypatch)
    layer = _frozen_conv(padding=1)
    x = torch.randn(shape)
    grad = torch.randn(layer(x).shape)
    out, grad_in = _run_frozen(layer, x, grad)
    expected_out, expected_grad = _reference(x, layer.weight, layer.bias, (1, 1), grad)
    assert (counted.conv, counted.grad) == (1, 1)
    torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_in.double(), expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["few positions", "few channels", "measured slower", "fp64", "stride 2"])
def test_a_frozen_conv_takes_the_direct_path_where_winograd_does_not_pay(case, monkeypatch):
    monkeypatch.setattr(winograd, "winograd_is_faster", lambda *geometry: case != "measured slower")
    if case != "few channels":
        monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    counted = _Counted(monkeypatch)
    layer = _frozen_conv(padding=1, stride=2 if case == "stride 2" else 1)
    side = 16 if case == "few positions" else 32
    x = torch.randn(1, 6, side, side)
    if case == "fp64":
        layer, x = layer.double(), x.double()
    grad = torch.randn(layer(x).shape, dtype=x.dtype)
    got = _run_frozen(layer, x, grad)
    expected = _run(layer, x, grad)
    assert (counted.conv, counted.grad) == (0, 0)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_kernel_transform_is_built_once_and_rebuilt_when_the_weight_changes(monkeypatch):
    monkeypatch.setattr(winograd, "winograd_is_faster", lambda *geometry: True)
    built = []
    real = winograd.kernel_transform
    monkeypatch.setattr(winograd, "kernel_transform", lambda w: built.append(1) or real(w))
    layer = _frozen_conv(padding=1)
    weights = WinogradWeights(layer)
    x = torch.randn(1, 6, 32, 32)
    first = weights.conv(x, layer.bias)
    weights.conv(x, layer.bias)
    weights.input_grad(torch.randn_like(first))
    assert len(built) == 1
    with torch.no_grad():
        layer.weight.mul_(2)  # a patch applied in place
    doubled = weights.conv(x, None)
    assert len(built) == 2
    torch.testing.assert_close(doubled, F.conv2d(x, layer.weight, padding=1), rtol=1e-5, atol=1e-5)



@pytest.fixture
def fresh_probes():
    """No call geometry measured yet in this process, before and after the test."""
    winograd.winograd_is_faster.cache_clear()
    winograd._measured.clear()
    yield
    winograd.winograd_is_faster.cache_clear()
    winograd._measured.clear()


def test_each_call_geometry_is_probed_once_and_decides_its_own_path(fresh_probes, monkeypatch):
    """One layer over two map sizes: the probe for 32x32 finds Winograd faster, the one for 40x40
    does not. Each size is probed once, and each call takes the path its own probe chose."""
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    probed = []

    def timed(direct, transformed, repeats):
        side = direct().shape[-1]
        probed.append(side)
        return (1.0, 0.5) if side == 32 else (1.0, 1.0)

    monkeypatch.setattr(winograd, "best_times", timed)
    layer = _frozen_conv(padding=1)
    inputs = {side: torch.randn(1, 6, side, side) for side in (32, 40)}
    grads = {side: torch.randn(1, 5, side, side) for side in (32, 40)}
    for side in (32, 40, 32):
        _run_frozen(layer, inputs[side], grads[side])
    assert probed == [32, 40]
    assert sorted(winograd.measured_choices().values()) == [False, True]

    counted = _Counted(monkeypatch)
    for side, expected_calls in ((32, (1, 1)), (40, (0, 0))):
        counted.conv = counted.grad = 0
        out, grad_in = _run_frozen(layer, inputs[side], grads[side])
        assert (counted.conv, counted.grad) == expected_calls
        expected_out, expected_grad = _reference(inputs[side], layer.weight, layer.bias, (1, 1), grads[side])
        torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_in.double(), expected_grad, rtol=1e-5, atol=1e-5)
    assert probed == [32, 40]


def test_a_probe_whose_result_differs_chooses_the_direct_conv(fresh_probes, monkeypatch):
    monkeypatch.setattr(winograd, "best_times", lambda direct, transformed, repeats: (1.0, 0.1))
    monkeypatch.setattr(winograd, "kernel_transform", lambda weight: torch.zeros(16, *weight.shape[:2]))
    assert winograd.winograd_is_faster(1, 8, 8, 32, 32, (1, 1)) is False


def test_the_probe_is_invisible_to_an_active_dispatch_mode(fresh_probes):
    """The first call of a geometry may come inside the checkpoint plan's measuring forward or a
    FLOP counter; neither may count the probe's convolutions as the layer's work."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recorder() as recorder:
        torch.ones(2) + 1  # the recorder sees ops outside the probe
        winograd.winograd_is_faster(1, 8, 8, 32, 32, (1, 1))
    assert winograd.winograd_is_faster.cache_info().currsize == 1
    assert recorder.ops and not [op for op in recorder.ops if "conv" in op or "bmm" in op]
