"""LoRA math against the textbook formula, and bypass == weight-wrapper on real layers."""
import pytest
import torch

from loralab.adapters.base import LayerSpec, apply_base_op
from loralab.adapters.lora import LoRAAdapter
from loralab.adapters.network import AdapterNetwork
from loralab.adapters.targets import Target


def _trained(adapter: LoRAAdapter, seed=1) -> LoRAAdapter:
    """Give ``down`` (zero when fresh) non-zero values, as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.lora_down.copy_(torch.randn(adapter.lora_down.shape, generator=g) * 0.1)
    return adapter


def test_fresh_adapter_is_an_exact_noop():
    layer = torch.nn.Linear(16, 12)
    adapter = LoRAAdapter(LayerSpec.of(layer), rank=4, alpha=4.0)
    x = torch.randn(3, 16)
    assert torch.equal(adapter.forward_delta(x), torch.zeros(3, 12))
    assert torch.equal(adapter.delta_weight(), torch.zeros(12, 16))
    assert torch.equal(adapter.lora_down, torch.zeros(4, 16))
    assert adapter.lora_up.abs().sum() > 0  # the other factor is random so gradients flow


def test_linear_delta_matches_reference_formula():
    layer = torch.nn.Linear(10, 6)
    adapter = _trained(LoRAAdapter(LayerSpec.of(layer), rank=3, alpha=1.5))
    up, down = adapter.lora_up.detach(), adapter.lora_down.detach()
    expected = (1.5 / 3) * up @ down
    torch.testing.assert_close(adapter.delta_weight(), expected)
    x = torch.randn(5, 10)
    torch.testing.assert_close(adapter.forward_delta(x), x @ expected.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1)])
def test_conv_bypass_equals_merged_weight(kernel, stride, padding):
    layer = torch.nn.Conv2d(8, 5, kernel, stride=stride, padding=padding)
    spec = LayerSpec.of(layer)
    adapter = _trained(LoRAAdapter(spec, rank=2, alpha=2.0))
    x = torch.randn(2, 8, 9, 9)
    merged = torch.nn.functional.conv2d(x, layer.weight + adapter.delta_weight(), layer.bias, stride, padding)
    bypass = layer(x) + adapter.forward_delta(x)
    torch.testing.assert_close(bypass, merged, rtol=1e-4, atol=1e-5)
    assert apply_base_op(spec, x, adapter.delta_weight()).abs().sum() > 0


def test_network_state_dict_roundtrip_uses_comfy_keys():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Conv2d(4, 4, 1))
    targets = [Target("0", model[0]), Target("1", model[1])]
    net = AdapterNetwork.create(targets, "lora", rank=2, alpha=1.0, seed=3)
    for layer in net.layers:
        _trained(layer)
    state = net.to_state_dict()
    assert "diffusion_model.0.lora_up.weight" in state and "diffusion_model.1.alpha" in state
    loaded, unmatched = AdapterNetwork.from_state_dict(dict(model.named_modules()), state)
    assert unmatched == []
    for a, b in zip(net.layers, loaded.layers):
        torch.testing.assert_close(a.delta_weight(), b.delta_weight())


def test_create_is_deterministic_in_seed():
    layer = torch.nn.Linear(6, 6)
    make = lambda seed: AdapterNetwork.create([Target("l", layer)], "lora", 2, 1.0, seed=seed).layers[0].lora_up
    assert torch.equal(make(5), make(5))
    assert not torch.equal(make(5), make(6))


def test_pattern_that_matches_nothing_lists_real_layer_names():
    from loralab.adapters.targets import select_targets
    model = torch.nn.Module()
    model.attn1 = torch.nn.Module()
    model.attn1.to_q = torch.nn.Linear(4, 4)
    model.ff = torch.nn.Module()
    model.ff.net = torch.nn.Linear(4, 4)
    assert [t.name for t in select_targets(model, "attention")] == ["attn1.to_q"]
    assert [t.name for t in select_targets(model, "attention+feed-forward", exclude="attn")] == ["ff.net"]
    with pytest.raises(ValueError, match=r"include='nothing_here'.*attn1\.to_q"):
        select_targets(model, include="nothing_here")
    with pytest.raises(ValueError, match=r"include_pattern '\(' is not a valid regular expression"):
        select_targets(model, include="(")
    with pytest.raises(ValueError, match=r"exclude_pattern '\[' is not a valid regular expression"):
        select_targets(model, include="attn", exclude="[")


def test_alpha_zero_means_alpha_equals_rank_as_in_kohya():
    """Taken literally, alpha 0 scales every update and every gradient to zero: the run would save
    a LoRA that changes nothing."""
    layer = torch.nn.Linear(6, 5)
    [adapter] = AdapterNetwork.create([Target("l", layer)], "lora", 4, 0.0, seed=3).layers
    assert float(adapter.alpha) == 4.0 and adapter.scale == 1.0
    with torch.no_grad():
        adapter.lora_down.normal_()  # as after a step: both factors non-zero (down starts at zero)
    x = torch.randn(3, 6)
    adapter.bypass(x, layer(x), layer).sum().backward()
    assert adapter.lora_down.grad.abs().sum() > 0 and adapter.lora_up.grad.abs().sum() > 0
