"""The oneDNN LoRA kernel: the same output and gradients as the textbook formula, for Linear,
pointwise-conv and k x k conv layouts, and low_rank_add takes it where it applies."""
import pytest
import torch

from loralab.adapters import cpu_kernels, lora
from loralab.adapters.base import LayerSpec
from loralab.adapters.conv_taps import ConvTaps
from loralab.adapters.cpu_kernels import low_rank_add_fp32

if not torch.backends.mkldnn.is_available():
    pytest.fail("this torch has no oneDNN; the oneDNN kernels cannot be checked", pytrace=False)


def _reference(base, x, up, down, c, pointwise_conv):
    up2, down2 = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
    if not pointwise_conv:
        return base + c * (x @ down2.t() @ up2.t())
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    return base + c * (up2 @ (down2 @ flat)).view(base.shape)


def _grads(fn, tensors, grad):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


CASES = {
    "linear, 2-D input": (False, (40, 24), (40, 36)),
    "linear, 3-D input": (False, (2, 20, 24), (2, 20, 36)),
    "pointwise conv, one image": (True, (1, 24, 5, 6), (1, 36, 5, 6)),
    "pointwise conv, two images": (True, (2, 24, 5, 6), (2, 36, 5, 6)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_low_rank_add_matches_the_formula(case):
    pointwise, x_shape, out_shape = CASES[case]
    g = torch.Generator().manual_seed(3)
    rank = 4
    tail = (1, 1) if pointwise else ()
    x = torch.randn(x_shape, generator=g)
    base = torch.randn(out_shape, generator=g)
    up = torch.randn((out_shape[1 if pointwise else -1], rank, *tail), generator=g)
    down = torch.randn((rank, x_shape[1 if pointwise else -1], *tail), generator=g)
    grad = torch.randn(out_shape, generator=g)

    expected = _grads(lambda b, xx, u, d: _reference(b, xx, u, d, 0.3, pointwise), (base, x, up, down), grad)
    got = _grads(lambda b, xx, u, d: low_rank_add_fp32(b, xx, u, d, 0.3, pointwise), (base, x, up, down), grad)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1], expected[1]):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# A k x k conv: (kernel, padding, dilation, input shape, output channels)
TAP_CASES = {
    "3x3 same padding": ((3, 3), (1, 1), (1, 1), (1, 10, 7, 9), 12),
    "3x3 no padding": ((3, 3), (0, 0), (1, 1), (1, 10, 7, 9), 12),
    "3x3 dilated, two images": ((3, 3), (2, 2), (2, 2), (2, 10, 6, 6), 12),
    "1x5 kernel, uneven padding": ((1, 5), (0, 1), (1, 1), (1, 6, 5, 8), 4),
    "padding wider than the kernel reaches": ((3, 3), (3, 2), (1, 1), (1, 6, 4, 5), 8),
}


@pytest.mark.parametrize("case", list(TAP_CASES))
def test_fused_low_rank_add_of_a_kxk_conv_matches_two_convolutions(case):
    """down as the layer's conv and up as a 1x1 conv, by torch's own convolution and autograd."""
    kernel, padding, dilation, x_shape, out_channels = TAP_CASES[case]
    g = torch.Generator().manual_seed(5)
    rank, c = 3, 0.7
    x = torch.randn(x_shape, generator=g)
    down = torch.randn((rank, x_shape[1], *kernel), generator=g)
    up = torch.randn((out_channels, rank, 1, 1), generator=g)
    h_shape = torch.nn.functional.conv2d(x, down, None, 1, padding, dilation).shape
    base = torch.randn((x_shape[0], out_channels, *h_shape[2:]), generator=g)
    grad = torch.randn(base.shape, generator=g)

    def reference(b, xx, u, d):
        return b + c * torch.nn.functional.conv2d(torch.nn.functional.conv2d(xx, d, None, 1, padding, dilation), u)

    def fused(b, xx, u, d):
        taps = ConvTaps(kernel, padding, dilation, *xx.shape[2:])
        return low_rank_add_fp32(b, xx, u, d, c, conv=True, taps=taps)

    expected = _grads(reference, (base, x, up, down), grad)
    got = _grads(fused, (base, x, up, down), grad)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(got[1], expected[1]):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


LAYERS = {"linear": (lambda: torch.nn.Linear(12, 10), True),
          "pointwise conv": (lambda: torch.nn.Conv2d(12, 10, 1), True),
          "3x3 conv": (lambda: torch.nn.Conv2d(12, 10, 3, padding=1), True),
          "3x3 conv, stride 2": (lambda: torch.nn.Conv2d(12, 10, 3, stride=2, padding=1), False),
          "3x3 conv1d": (lambda: torch.nn.Conv1d(12, 10, 3, padding=1), False)}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_low_rank_add_takes_the_fused_kernel_where_it_applies(kind, monkeypatch):
    calls = []
    real = cpu_kernels.low_rank_add_fp32
    monkeypatch.setattr(lora, "low_rank_add_fp32", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(lora, "use_onednn", lambda *tensors: True)
    make, fused = LAYERS[kind]
    layer = make()
    spec = LayerSpec.of(layer)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((3, 12) if kind == "linear" else (1, 12, *([6] * spec.conv_dims)), generator=g)
    base = layer(x).detach()
    up = torch.randn(spec.out_features, 2, *([1] * spec.conv_dims), generator=g)
    down = torch.randn(2, 12, *spec.kernel_size, generator=g)
    out = lora.low_rank_add(spec, base, x, up, down, 0.5)
    merged = layer.weight + 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
    expected = (torch.nn.functional.linear(x, merged, layer.bias) if kind == "linear"
                else layer._conv_forward(x, merged, layer.bias))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == (1 if fused else 0)


def test_kernel_probes_time_their_candidates_in_turns():
    """A probe's candidates run alternately, so a burst of load from another process slows both;
    each gets its own best time."""
    from loralab.adapters.cpu_kernels import best_times
    calls = []
    times = best_times(lambda: calls.append("a"), lambda: (calls.append("b"), sum(range(20000))), repeats=3)
    assert calls == ["a", "b"] * 4  # one warm-up call each, then three turns
    assert len(times) == 2 and 0 <= times[0] < times[1]


@pytest.mark.parametrize("times,expected", [
    # oneDNN loses on the first product but wins by 20% over all of them
    ({0: (1.0, 1.2), 1: (4.0, 2.8), 2: (1.0, 0.9), 3: (1.0, 0.9)}, True),
    # oneDNN wins every product, but by under 5% in total: not worth leaving torch's default
    ({0: (1.0, 0.98), 1: (4.0, 3.9), 2: (1.0, 0.97), 3: (1.0, 0.97)}, False),
], ids=["wins overall", "marginal"])
def test_the_matmul_kernel_is_chosen_on_the_sum_over_the_probe_products(times, expected, monkeypatch):
    shapes = list(cpu_kernels.PROBE_PRODUCTS)
    monkeypatch.setattr(cpu_kernels, "_probe_product_times",
                        lambda rows, inner, out, generator: times[shapes.index((rows, inner, out))])
    cpu_kernels.onednn_matmul_is_faster.cache_clear()
    try:
        assert cpu_kernels.onednn_matmul_is_faster() is expected
    finally:
        cpu_kernels.onednn_matmul_is_faster.cache_clear()


def test_the_matmul_probe_keeps_torchs_kernel_when_onednn_gives_another_result(monkeypatch):
    real = cpu_kernels.onednn_linear
    monkeypatch.setattr(cpu_kernels, "onednn_linear", lambda x, w, bias=None: real(x, w, bias) * 1.01)
    monkeypatch.setattr(cpu_kernels, "PROBE_PRODUCTS", ((64, 32, 48),))
    monkeypatch.setattr(cpu_kernels, "best_times", lambda *fns, repeats: [1.0, 0.5])  # oneDNN "twice as fast"
    cpu_kernels.onednn_matmul_is_faster.cache_clear()
    try:
        assert cpu_kernels.onednn_matmul_is_faster() is False
    finally:
        cpu_kernels.onednn_matmul_is_faster.cache_clear()
