"""The oneDNN LoRA kernel: the same output and gradients as the textbook formula, for Linear and
pointwise-conv layouts, and low_rank_add takes it where it applies."""
import pytest
import torch

from loralab.adapters import cpu_kernels, lora
from loralab.adapters.base import LayerSpec
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


@pytest.mark.parametrize("kind", ["linear", "pointwise conv", "3x3 conv"])
def test_low_rank_add_takes_the_fused_kernel_where_it_applies(kind, monkeypatch):
    calls = []
    real = cpu_kernels.low_rank_add_fp32
    monkeypatch.setattr(lora, "low_rank_add_fp32", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(lora, "use_onednn", lambda *tensors: True)
    layer = {"linear": torch.nn.Linear(12, 10), "pointwise conv": torch.nn.Conv2d(12, 10, 1),
             "3x3 conv": torch.nn.Conv2d(12, 10, 3, padding=1)}[kind]
    spec = LayerSpec.of(layer)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((3, 12) if kind == "linear" else (1, 12, 4, 4), generator=g)
    base = layer(x).detach()
    up = torch.randn(spec.out_features, 2, *([1] * spec.conv_dims), generator=g)
    down = torch.randn(2, 12, *spec.kernel_size, generator=g)
    out = lora.low_rank_add(spec, base, x, up, down, 0.5)
    merged = layer.weight + 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
    expected = (torch.nn.functional.linear(x, merged, layer.bias) if kind == "linear"
                else layer._conv_forward(x, merged, layer.bias))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == (0 if kind == "3x3 conv" else 1)
