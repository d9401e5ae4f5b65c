"""fp32 weights held as bf16 inside their own storage, and given back bit for bit."""
import torch

from loralab.sampler import bf16_weights
from loralab.sampler.bf16_weights import Bf16Weights, join_from_bf16, split_to_bf16
from loralab.sampler.frozen_layers import frozen_forward

EDGE_LOW_BITS = (0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF)


def _every_high_half_with_edge_low_bits() -> torch.Tensor:
    """fp32 bit patterns: each of the 65536 possible upper halves with the low halves where
    rounding changes (just below, at and just above half)."""
    high = torch.arange(1 << 16, dtype=torch.int64).repeat_interleave(len(EDGE_LOW_BITS))
    low = torch.tensor(EDGE_LOW_BITS, dtype=torch.int64).repeat(1 << 16)
    return ((high << 16) | low).to(torch.int32)  # wraps into int32's two's complement


def test_split_then_join_gives_back_every_bit_pattern():
    patterns = _every_high_half_with_edge_low_bits()
    weight = patterns.view(torch.float32).clone()
    split_to_bf16(weight)
    assert not torch.equal(weight.view(torch.int32), patterns)  # the storage really was rearranged
    join_from_bf16(weight)
    assert torch.equal(weight.view(torch.int32), patterns)


def test_split_rounds_like_torch_except_ties_which_go_away_from_zero():
    patterns = _every_high_half_with_edge_low_bits()
    values = patterns.view(torch.float32)
    held = split_to_bf16(values.clone())
    reference = values.to(torch.bfloat16)
    finite = torch.isfinite(values) & torch.isfinite(reference.float())
    differs = finite & (held.view(torch.int16) != reference.view(torch.int16))
    low = patterns & 0xFFFF
    assert bool((low[differs] == 0x8000).all())  # only exact ties differ from round-to-even
    ties = finite & (low == 0x8000) & (values != 0)
    assert bool((held.float()[ties].abs() > values[ties].abs()).all())
    assert int(differs.sum()) > 0  # ties whose even neighbour is below exist and were rounded up


def test_round_trip_across_chunks(monkeypatch):
    monkeypatch.setattr(bf16_weights, "_CHUNK", 1000)
    weight = torch.randn(37, 101, 3) * 10
    original = weight.clone()
    held = split_to_bf16(weight)
    assert held.shape == weight.shape and held.dtype == torch.bfloat16
    torch.testing.assert_close(held, original.to(torch.bfloat16), rtol=0, atol=0)  # random data: no exact ties here
    join_from_bf16(weight)
    assert torch.equal(weight.view(torch.int32), original.view(torch.int32))


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.GELU(), torch.nn.Linear(24, 16),
                                torch.nn.Unflatten(1, (1, 4, 4)), torch.nn.Conv2d(1, 6, 3, padding=1))
    model.requires_grad_(False)
    return model


def test_holding_swaps_in_bf16_views_and_release_restores_the_same_parameters():
    model = _model()
    layers = [model[0], model[2], model[4]]
    originals = [m.weight for m in layers]
    copies = [w.detach().clone() for w in originals]
    weights = Bf16Weights(model, layers, torch.device("cpu"))
    assert weights.hold() == 3
    for module, copy in zip(layers, copies):
        assert module.weight.dtype == torch.bfloat16
        torch.testing.assert_close(module.weight, copy.to(torch.bfloat16), rtol=0, atol=0)
    weights.release()
    for module, original, copy in zip(layers, originals, copies):
        assert module.weight is original
        assert torch.equal(original.view(torch.int32), copy.view(torch.int32))


def test_held_weights_add_no_memory():
    model = _model()
    storages = {m.weight.untyped_storage().data_ptr() for m in (model[0], model[2], model[4])}
    weights = Bf16Weights(model, [model[0], model[2], model[4]], torch.device("cpu"))
    weights.hold()
    assert {m.weight.untyped_storage().data_ptr() for m in (model[0], model[2], model[4])} == storages
    weights.release()


def test_frozen_forward_under_autocast_matches_the_per_call_cast():
    model = _model()
    layers = [model[0], model[2]]
    inputs = [torch.randn(5, 16), torch.randn(5, 24)]

    def outputs():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return [frozen_forward(m)(m, x) for m, x in zip(layers, inputs)]

    expected = outputs()  # fp32 weights, cast by each call
    weights = Bf16Weights(model, layers, torch.device("cpu"))
    weights.hold()
    got = outputs()
    weights.release()
    for e, g in zip(expected, got):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_unsafe_layers_are_left_as_stored():
    model = _model()
    tied = torch.nn.Linear(16, 24, bias=False)
    tied.weight = model[0].weight  # one storage, two layers: holding it would corrupt the other
    model.append(tied)
    model[2].weight.requires_grad_(True)  # trainable
    model[4].weight_function = [lambda w: w]  # patched on the fly by ComfyUI
    weights = Bf16Weights(model, [model[0], model[2], model[4], tied], torch.device("cpu"))
    assert weights.hold() == 0
    assert all(m.weight.dtype == torch.float32 for m in (model[0], model[2], model[4], tied))


def test_released_gives_fp32_for_a_while_then_holds_again():
    model = _model()
    copy = model[0].weight.detach().clone()
    weights = Bf16Weights(model, [model[0]], torch.device("cpu"))
    weights.hold()
    with weights.released():
        assert model[0].weight.dtype == torch.float32
        assert torch.equal(model[0].weight.view(torch.int32), copy.view(torch.int32))
    assert model[0].weight.dtype == torch.bfloat16
    weights.release()
    assert torch.equal(model[0].weight.view(torch.int32), copy.view(torch.int32))
