"""Frozen base layers: the layer's own output and input gradient, with nothing saved for backward."""
import pytest
import torch

from loralab.sampler import frozen_layers
from loralab.sampler.frozen_layers import frozen_forward, onednn_matmul_is_faster
from loralab.sampler.winograd import winograd_is_faster


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    return module


def _output_and_input_grad(forward, x: torch.Tensor, grad: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = forward(x)
    out.backward(grad)
    return out.detach(), x.grad


def _saved_tensor_count(forward, x: torch.Tensor) -> int:
    """How many tensors autograd keeps for the backward of ``forward(x)``."""
    count = 0

    def pack(tensor):
        nonlocal count
        count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(x.clone().requires_grad_(True))
    return count


LAYERS = {
    "linear": (lambda: torch.nn.Linear(48, 40), (3, 7, 48)),
    "linear, no bias": (lambda: torch.nn.Linear(48, 40, bias=False), (5, 48)),
    "conv 3x3": (lambda: torch.nn.Conv2d(12, 16, 3, padding=1), (2, 12, 9, 9)),
    "conv 3x3 stride 2": (lambda: torch.nn.Conv2d(12, 16, 3, stride=2, padding=1), (2, 12, 9, 9)),
    "conv 1x1": (lambda: torch.nn.Conv2d(12, 16, 1), (1, 12, 8, 8)),
    "grouped conv": (lambda: torch.nn.Conv2d(12, 16, 3, padding=1, groups=4), (1, 12, 6, 6)),
    "conv1d dilated": (lambda: torch.nn.Conv1d(6, 8, 3, padding=2, dilation=2), (2, 6, 11)),
}


@pytest.mark.parametrize("onednn", [False, True], ids=["torch kernel", "oneDNN kernel"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_frozen_layer_matches_the_layer_and_saves_nothing(kind, onednn, monkeypatch):
    if onednn and not torch.backends.mkldnn.is_available():
        pytest.fail("this torch has no oneDNN; the oneDNN path cannot be checked")
    monkeypatch.setattr(frozen_layers, "onednn_matmul_is_faster", lambda: onednn)
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    layer = _frozen(make())
    x = torch.randn(shape)
    grad = torch.randn(layer(x).shape)
    frozen = frozen_forward(layer)

    expected = _output_and_input_grad(layer, x, grad)
    got = _output_and_input_grad(lambda t: frozen(layer, t), x, grad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert _saved_tensor_count(layer, x) >= 1  # torch's own layer keeps its input
    assert _saved_tensor_count(lambda t: frozen(layer, t), x) == 0


def test_trainable_or_patched_layers_run_their_own_forward(monkeypatch):
    """A trainable weight (weight-wrapper mode) or a ComfyUI weight function must not take the
    frozen path: the gradient would not reach the weight, or the patch would be skipped."""
    calls = []
    monkeypatch.setattr(frozen_layers._FrozenLinear, "apply", lambda *a: calls.append(a) or a[0])
    layer = _frozen(torch.nn.Linear(8, 8))
    frozen = frozen_forward(layer)
    x = torch.randn(2, 8)

    frozen(layer, x)
    assert len(calls) == 1  # the frozen case does

    layer.weight.requires_grad_(True)
    torch.testing.assert_close(frozen(layer, x), layer(x))
    layer.weight.requires_grad_(False)

    layer.weight_function = [lambda w: w * 2]
    torch.testing.assert_close(frozen(layer, x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert len(calls) == 1


def test_comfyui_cast_layer_is_frozen_with_the_cast_weight():
    """A ComfyUI layer that casts its stored weights (here bf16 storage, fp32 compute, as fp8
    storage and offloading also do) computes the same, and keeps no cast copy for the backward."""
    import comfy.ops
    torch.manual_seed(0)
    layer = _frozen(comfy.ops.manual_cast.Linear(24, 16, dtype=torch.bfloat16))
    with torch.no_grad():
        layer.weight.copy_(torch.randn(16, 24))
        layer.bias.copy_(torch.randn(16))
    x, grad = torch.randn(4, 24), torch.randn(4, 16)
    frozen = frozen_forward(layer)
    got = _output_and_input_grad(lambda t: frozen(layer, t), x, grad)
    expected = _output_and_input_grad(layer, x, grad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got[0].dtype == torch.float32
    assert _saved_tensor_count(layer, x) >= 1
    assert _saved_tensor_count(lambda t: frozen(layer, t), x) == 0


@pytest.mark.parametrize("make,shape", [(lambda: torch.nn.Linear(32, 24), (6, 32)),
                                        (lambda: torch.nn.Conv2d(8, 12, 3, padding=1), (1, 8, 6, 6))],
                         ids=["linear", "conv"])
def test_under_autocast_the_layer_computes_in_the_autocast_dtype(make, shape):
    torch.manual_seed(0)
    layer = _frozen(make())
    x = torch.randn(shape)
    frozen = frozen_forward(layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        grad = torch.randn(out.shape).to(out.dtype)
        expected = _output_and_input_grad(layer, x, grad)
        got = _output_and_input_grad(lambda t: frozen(layer, t), x, grad)
        assert _saved_tensor_count(lambda t: frozen(layer, t), x) == 0
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("probe,args", [(onednn_matmul_is_faster, ()), (winograd_is_faster, (1, 64, 64, 32, 32, (1, 1)))],
                         ids=["matmul kernel", "3x3 conv geometry"])
def test_each_kernel_choice_is_measured_once_and_is_a_bool(probe, args):
    probe.cache_clear()
    first = probe(*args)
    assert isinstance(first, bool)
    assert probe(*args) is first
    assert probe.cache_info().hits >= 1


@pytest.mark.parametrize("kind", [k for k in LAYERS if "conv" in k])
def test_conv_output_shape_is_the_layers(kind):
    from loralab.sampler.frozen_layers import _conv_output_shape
    make, shape = LAYERS[kind]
    layer = make()
    assert _conv_output_shape(torch.Size(shape), layer) == tuple(layer(torch.randn(shape)).shape)


@pytest.mark.parametrize("onednn", [False, True], ids=["torch kernel", "oneDNN kernel"])
@pytest.mark.parametrize("kind", ["linear", "linear, no bias", "conv 3x3 stride 2", "conv1d dilated"])
def test_a_bias_offset_joins_the_layers_bias_with_its_gradient(kind, onednn, monkeypatch):
    """A trainable bias offset fed as ``output_bias``: the output is the layer's plus the offset on
    the channel axis, and the offset gets the gradient of that sum, with nothing kept for it."""
    monkeypatch.setattr(frozen_layers, "onednn_matmul_is_faster", lambda: onednn)
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    layer = _frozen(make())
    x = torch.randn(shape)
    channels = layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels
    on_axis = (-1,) if isinstance(layer, torch.nn.Linear) else (-1, *([1] * (len(shape) - 2)))
    grad = torch.randn(layer(x).shape)
    frozen = frozen_forward(layer)

    def run(forward):
        offset = torch.linspace(-1, 1, channels).requires_grad_(True)
        out, x_grad = _output_and_input_grad(lambda t: forward(t, offset), x, grad)
        return out, x_grad, offset.grad

    expected = run(lambda t, offset: layer(t) + offset.view(on_axis))
    got = run(lambda t, offset: frozen(layer, t, output_bias=offset))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got[2].abs().sum() > 0
    offset = torch.zeros(channels, requires_grad=True)
    assert _saved_tensor_count(lambda t: frozen(layer, t, output_bias=offset), x) == 0
