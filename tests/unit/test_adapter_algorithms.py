"""Every adapter algorithm (LoRA, DoRA, LoHa, LoKr, OFT, BOFT, GLoRA) on Linear / 1x1 conv /
strided 3x3 conv: exact no-op at step 0 with gradients, bypass == merged weight, merged weight ==
a textbook formula written here, ComfyUI's own loader computes the same weight from our file, and
state dicts round-trip and are not mistaken for another algorithm's."""

import pytest
import torch

import comfy.weight_adapter as comfy_adapters
from comfy.weight_adapter.base import factorization as comfy_factorization

from loralab.adapters.attach import _hooked_forward
from loralab.adapters.base import LayerSpec
from loralab.adapters.lokr import factorization
from loralab.adapters.lora import EPS, LoRAAdapter
from loralab.adapters.network import AdapterNetwork
from loralab.adapters.registry import ALGORITHM_OPTIONS, ALGORITHMS
from loralab.adapters.targets import Target

LAYERS = {
    "linear": lambda: torch.nn.Linear(16, 32),
    "conv1x1": lambda: torch.nn.Conv2d(8, 32, 1),
    "conv3x3s2": lambda: torch.nn.Conv2d(8, 32, 3, stride=2, padding=1),
}
# id: (algorithm, rank, alpha, options, parameter names this case must have)
CASES = {
    "lora": ("lora", 4, 2.0, {}, {"lora_up", "lora_down"}),
    "dora": ("dora", 4, 2.0, {}, {"lora_up", "lora_down", "dora_scale"}),
    "loha_factored": ("loha", 2, 3.0, {}, {"hada_w1_a", "hada_w2_b"}),
    "loha_full": ("loha", 5, 3.0, {}, {"hada_w1_a", "hada_w2_b"}),
    "lokr": ("lokr", 2, 3.0, {}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "lokr_both": ("lokr", 1, 2.0, {"decompose_both": True}, {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a"}),
    "lokr_full": ("lokr", 2, 3.0, {"full_matrix": True, "factor": 2}, {"lokr_w1", "lokr_w2"}),
    "oft": ("oft", 4, 1.0, {}, {"oft_blocks"}),
    "oft_coft": ("oft", 4, 1.0, {"block_size": 8, "constraint": 0.3}, {"oft_blocks"}),
    "boft": ("boft", 4, 1.0, {}, {"oft_blocks"}),
    "boft_coft_rescale": ("boft", 4, 1.0, {"boft_m": 2, "constraint": 0.3, "rescale": True},
                          {"oft_blocks", "rescale"}),
    "glora": ("glora", 3, 1.5, {}, {"a1", "a2", "b1", "b2"}),
}
KEY = "diffusion_model.x"


def _input(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (3, layer.in_features) if isinstance(layer, torch.nn.Linear) else (2, layer.in_channels, 7, 7)
    return torch.randn(shape, generator=g)


def _run(layer, x, weight):
    if isinstance(layer, torch.nn.Linear):
        return torch.nn.functional.linear(x, weight, layer.bias)
    return torch.nn.functional.conv2d(x, weight, layer.bias, layer.stride, layer.padding)


def _make(case, layer_name, seed=0):
    torch.manual_seed(seed)
    layer = LAYERS[layer_name]()
    algorithm, rank, alpha, options, names = CASES[case]
    adapter = ALGORITHMS[algorithm].create(LayerSpec.of(layer), rank, alpha,
                                           generator=torch.Generator().manual_seed(seed), **options)
    assert names <= {n for n, _ in adapter.named_parameters()}
    return layer, adapter


def _trained(case, layer_name, seed=0):
    """An adapter whose parameters are all random, as after training."""
    layer, adapter = _make(case, layer_name, seed)
    if adapter.algorithm == "dora":
        adapter.init_magnitude(layer.weight.detach())
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name == "dora_scale":
                p.mul_(1 + 0.2 * noise)
            elif name == "rescale":
                p.add_(0.1 * noise)
            else:
                p.copy_(noise * (0.1 if name == "oft_blocks" else 0.3))
    return layer, adapter


def _params(adapter):
    return {n: p.detach().clone() for n, p in adapter.named_parameters()}


# --- textbook formulas, written independently of the adapters ----------------------------------
def _cayley(blocks, constraint):
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0 and q.norm() + 1e-8 > constraint:
        q = q * constraint / (q.norm() + 1e-8)
    eye = torch.eye(q.shape[-1])
    return (eye + q) @ torch.linalg.inv(eye - q)


def _butterfly_perm(n, block, stage):
    """P with (P t)[new] = t[old]: position a*2h + g*h + j moves to a*2h + 2j + g, h = 2^stage*block/2."""
    h = 2 ** stage * block // 2
    perm = torch.zeros(n, n)
    for old in range(n):
        a, g, j = old // (2 * h), (old % (2 * h)) // h, old % h
        perm[a * 2 * h + 2 * j + g, old] = 1.0
    return perm


def reference_weight(adapter, W, s):
    p = _params(adapter)
    alg, k = adapter.algorithm, None
    shape, rows = W.shape, W.reshape(W.shape[0], -1)
    if alg in ("lora", "dora"):
        k = float(adapter.alpha) / p["lora_down"].shape[0]
        delta = k * (p["lora_up"].flatten(1) @ p["lora_down"].flatten(1)).reshape(shape)
        if alg == "lora":
            return W + s * delta
        calc = W + delta
        col_norm = torch.stack([calc[:, j].norm() for j in range(shape[1])])
        col_norm = col_norm.reshape(1, -1, *([1] * (W.ndim - 2)))
        return W + s * (p["dora_scale"] * calc / (col_norm + EPS) - W)
    if alg == "loha":
        k = float(adapter.alpha) / p["hada_w1_b"].shape[0]
        m1, m2 = p["hada_w1_a"] @ p["hada_w1_b"], p["hada_w2_a"] @ p["hada_w2_b"]
        return W + s * k * (m1 * m2).reshape(shape)
    if alg == "lokr":
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        low = p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else (p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else None)
        k = float(adapter.alpha) / low if low else 1.0
        kron = torch.einsum("ab,cd->acbd", w1, w2.flatten(1)).reshape(shape[0], -1)
        return W + s * k * kron.reshape(shape)
    if alg == "oft":
        rots = _cayley(p["oft_blocks"], float(adapter.alpha))
        big = torch.block_diag(*[r.T for r in rots])
        return W + s * s * ((big - torch.eye(shape[0])) @ rows).reshape(shape)
    if alg == "boft":
        rots = _cayley(p["oft_blocks"], float(adapter.alpha))
        n, block = shape[0], rots.shape[-1]
        total = torch.eye(n)
        for i, stage in enumerate(rots):
            mixed = torch.block_diag(*[s * r + (1 - s) * torch.eye(block) for r in stage])
            perm = _butterfly_perm(n, block, i)
            total = perm.T @ mixed @ perm @ total
        rotated = (total @ rows).reshape(shape)
        if "rescale" in p:
            rotated = rotated * p["rescale"]
        return W + s * (rotated - W)
    if alg == "glora":
        k = float(adapter.alpha) / p["a2"].shape[0]
        taps = W.reshape(shape[0], shape[1], -1)
        wa = torch.einsum("oit,ir,rj->ojt", taps, p["a1"], p["a2"]).reshape(shape)
        return W + s * k * (wa + (p["b1"].flatten(1) @ p["b2"].flatten(1)).reshape(shape))
    raise AssertionError(alg)


ALL = [(c, l) for c in CASES for l in LAYERS]


@pytest.mark.parametrize("case,layer_name", ALL)
def test_fresh_adapter_is_exact_noop_and_gets_gradients(case, layer_name):
    layer, adapter = _make(case, layer_name)
    W = layer.weight.detach().clone()
    x = _input(layer)
    with torch.no_grad():
        base = layer(x)
        for s in (1.0, 0.5):
            assert torch.equal(adapter.bypass(x, base, layer, s), base)
            assert torch.equal(adapter.merged_weight(W, s), W)
    out = adapter.bypass(x, layer(x), layer, 1.0)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
    grads = {n: p.grad for n, p in adapter.named_parameters()}
    assert all(g is not None for g in grads.values())
    for name, p in adapter.named_parameters():
        if torch.count_nonzero(p.detach()) == 0:  # a zero-initialised factor must be able to move
            assert grads[name].abs().sum() > 0, name
    assert sum(g.abs().sum() for g in grads.values()) > 0


@pytest.mark.parametrize("s", [1.0, 0.5])
@pytest.mark.parametrize("case,layer_name", ALL)
def test_bypass_equals_layer_with_merged_weight(case, layer_name, s):
    layer, adapter = _trained(case, layer_name)
    x = _input(layer, seed=1)
    with torch.no_grad():
        merged = adapter.merged_weight(layer.weight, s)
        assert (merged - layer.weight).abs().max() > 1e-3  # the adapter really changes something
        expected = _run(layer, x, merged)
        got = adapter.bypass(x, layer(x), layer, s)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("s", [1.0, 0.5])
@pytest.mark.parametrize("case,layer_name", ALL)
def test_hooked_layer_with_a_bias_offset_equals_merged_weight_and_offset_bias(case, layer_name, s):
    """A trained bias offset (.diff_b) joins the layer's bias and is not rotated by OFT/BOFT: the
    loader merges the weight and adds the offset to the bias, and bypass must train that function."""
    layer, adapter = _trained(case, layer_name)
    offset = torch.randn(layer.bias.shape, generator=torch.Generator().manual_seed(5))
    x = _input(layer, seed=1)
    with torch.no_grad():
        merged = adapter.merged_weight(layer.weight, s)
        shifted = _run(layer, x, merged) - _run(layer, x, torch.zeros_like(merged))  # W' x, no bias
        bias = (layer.bias + s * offset).view(-1, *([1] * (shifted.ndim - 2))) if shifted.ndim > 2 else layer.bias + s * offset
        got = _hooked_forward(layer, adapter, offset, s)(x)
    torch.testing.assert_close(got, shifted + bias, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("s", [1.0, 0.5])
@pytest.mark.parametrize("case,layer_name", ALL)
def test_merged_weight_matches_reference_formula(case, layer_name, s):
    layer, adapter = _trained(case, layer_name)
    W = layer.weight.detach().clone()
    with torch.no_grad():
        torch.testing.assert_close(adapter.merged_weight(W, s), reference_weight(adapter, W, s),
                                   rtol=1e-4, atol=1e-5)


def _comfy_adapter(state):
    """What ComfyUI's loader builds from our keys (as comfy.lora.load_lora does), checking that
    exactly one of its adapter classes claims them and every key is consumed."""
    alpha = state[f"{KEY}.alpha"].item() if f"{KEY}.alpha" in state else None
    dora_scale = state.get(f"{KEY}.dora_scale")
    found, loaded = [], {f"{KEY}.alpha"} | ({f"{KEY}.dora_scale"} if dora_scale is not None else set())
    for cls in comfy_adapters.adapters:
        keys = set()
        adapter = cls.load(KEY, state, alpha, dora_scale, keys)
        if adapter is not None:
            found.append(adapter)
            loaded |= keys
    assert len(found) == 1, [type(a).__name__ for a in found]
    assert loaded == set(state)
    return found[0]


@pytest.mark.parametrize("case,layer_name", ALL)
def test_comfyui_loader_computes_the_same_weight(case, layer_name):
    layer, adapter = _trained(case, layer_name)
    W = layer.weight.detach().clone()
    comfy = _comfy_adapter(adapter.to_state_dict(KEY))
    expected_name = {"dora": "lora"}.get(adapter.algorithm, adapter.algorithm)
    assert comfy.name == expected_name
    for s in (1.0, 0.5):
        theirs = comfy.calculate_weight(W.clone(), KEY + ".weight", s, 1.0, None, lambda a: a, torch.float32)
        with torch.no_grad():
            ours = adapter.merged_weight(W, s)
        assert (ours - W).abs().max() > 1e-3
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case,layer_name", ALL)
def test_state_dict_round_trip(case, layer_name):
    layer, adapter = _trained(case, layer_name)
    state = adapter.to_state_dict(KEY)
    tensors = {k[len(KEY) + 1:]: v for k, v in state.items()}
    loaded = type(adapter).from_state_dict(LayerSpec.of(layer), tensors)
    if loaded is None:  # "dora" loads through LoRA
        loaded = LoRAAdapter.from_state_dict(LayerSpec.of(layer), tensors)
    again = loaded.to_state_dict(KEY)
    assert set(again) == set(state)
    for key in state:
        assert torch.equal(again[key], state[key]), key
    assert loaded.algorithm == adapter.algorithm and loaded.rank == adapter.rank
    with torch.no_grad():
        assert torch.equal(loaded.merged_weight(layer.weight, 0.5), adapter.merged_weight(layer.weight, 0.5))


@pytest.mark.parametrize("layer_name", ["linear", "conv3x3s2"])
def test_from_state_dict_rejects_other_algorithms_tensors(layer_name):
    files = {}
    for case in CASES:
        layer, adapter = _trained(case, layer_name)
        files[case] = (adapter.algorithm, {k[len(KEY) + 1:]: v for k, v in adapter.to_state_dict(KEY).items()})
    spec = LayerSpec.of(layer)
    family = {"dora": "lora"}
    for name, cls in ALGORITHMS.items():
        for case, (algorithm, tensors) in files.items():
            result = cls.from_state_dict(spec, tensors)
            if name == "dora":
                assert result is None  # DoRA files are LoRA files
            elif family.get(algorithm, algorithm) == name:
                assert result is not None and result.algorithm == algorithm, (name, case)
            else:
                assert result is None, (name, case)


def test_dora_magnitude_is_per_input_channel_and_rejects_output_axis():
    layer, adapter = _trained("dora", "conv3x3s2")
    state = adapter.to_state_dict(KEY)
    assert state[f"{KEY}.dora_scale"].shape == (1, 8, 1, 1)
    tensors = {k[len(KEY) + 1:]: v for k, v in state.items()}
    tensors["dora_scale"] = torch.ones(32, 1, 1, 1)
    with pytest.raises(ValueError, match="output axis"):
        LoRAAdapter.from_state_dict(LayerSpec.of(layer), tensors)
    fresh = ALGORITHMS["dora"].create(LayerSpec.of(layer), 2, 1.0)
    with pytest.raises(RuntimeError, match="not initialised"):
        fresh.to_state_dict(KEY)


def test_loha_takes_the_factored_path_only_when_cheaper():
    for layer_name in LAYERS:
        assert _make("loha_factored", layer_name)[1].use_factored()
        assert not _make("loha_full", layer_name)[1].use_factored()


@pytest.mark.parametrize("factor", [-1, 0, 1, 2, 3, 4, 8, 16])
def test_lokr_factorization_matches_comfyui(factor):
    for dim in range(1, 400):
        assert factorization(dim, factor) == comfy_factorization(dim, factor), (dim, factor)


def test_oft_and_boft_block_layout():
    spec = LayerSpec.of(torch.nn.Linear(16, 32))
    assert ALGORITHMS["oft"].create(spec, 8, 1.0).oft_blocks.shape == (8, 4, 4)  # LyCORIS: 32 -> 4 x 8
    assert ALGORITHMS["oft"].create(spec, 8, 1.0, block_size=8).oft_blocks.shape == (4, 8, 8)
    assert ALGORITHMS["boft"].create(spec, 4, 1.0).oft_blocks.shape == (4, 8, 4, 4)
    assert ALGORITHMS["boft"].create(spec, 6, 1.0, boft_m=2).oft_blocks.shape == (2, 8, 4, 4)
    assert ALGORITHMS["boft"].create(LayerSpec.of(torch.nn.Linear(4, 24)), 4, 1.0).oft_blocks.shape == (2, 6, 4, 4)


@pytest.mark.parametrize("case", ["oft_coft", "boft_coft_rescale"])
def test_coft_cases_really_hit_the_constraint(case):
    layer, adapter = _trained(case, "linear")
    blocks = adapter.oft_blocks.detach()
    assert (blocks - blocks.transpose(-1, -2)).norm() > 2 * float(adapter.alpha) > 0


def test_glora_refuses_the_shape_comfyui_reads_as_old_glora():
    with pytest.raises(ValueError, match="old GLoRA"):
        ALGORITHMS["glora"].create(LayerSpec.of(torch.nn.Linear(4, 4)), 4, 1.0)


def test_registry_options_are_accepted_and_network_round_trips():
    assert set(ALGORITHM_OPTIONS) == set(ALGORITHMS)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Conv2d(8, 32, 3, padding=1))
    targets = [Target("0", model[0]), Target("1", model[1])]
    for name, options in ALGORITHM_OPTIONS.items():
        net = AdapterNetwork.create(targets, name, 4, 2.0, seed=1, **options)
        assert net.algorithm == name
        for adapter, module in zip(net.layers, model):
            adapter.merged_weight(module.weight.detach())  # initialises DoRA's magnitude
            with torch.no_grad():
                for p in adapter.parameters():
                    p.add_(0.05)
        loaded, unmatched = AdapterNetwork.from_state_dict(dict(model.named_modules()), net.to_state_dict())
        assert unmatched == []
        for a, b, module in zip(net.layers, loaded.layers, model):
            assert b.algorithm == a.algorithm
            with torch.no_grad():
                torch.testing.assert_close(b.merged_weight(module.weight), a.merged_weight(module.weight))


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that copy a tensor's value back to the host (``float(t)``, ``t.item()``):
    on a GPU each is a sync that stalls the whole step."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case,layer_name", ALL)
def test_bypass_forward_and_backward_read_nothing_back_to_the_host(case, layer_name):
    layer, adapter = _trained(case, layer_name)
    x = _input(layer, seed=1)
    adapter.bypass(x, layer(x), layer, 1.0)  # a first call may set itself up once
    with _HostReads() as reads:
        out = adapter.bypass(x, layer(x), layer, 0.5)
        out.square().sum().backward()
    assert reads.count == 0


@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize("case", list(CASES))
def test_bypass_reads_the_base_weight_only_where_the_adapter_says_so(case, layer_name):
    """Training holds a layer's weight in another form (bf16 in place) unless its adapter declares
    that ``bypass`` reads it: the others must compute from the layer's output alone."""
    layer, adapter = _trained(case, layer_name)
    x = _input(layer)
    with torch.no_grad():
        base_out = _run(layer, x, layer.weight)
        expected = adapter.bypass(x, base_out, layer)
        layer.weight.fill_(float("nan"))
        got = adapter.bypass(x, base_out, layer)
    if adapter.reads_base_weight:
        assert torch.isnan(got).any()  # it does read it: the declaration is needed
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("algorithm", ["loha", "lokr", "glora", "oft"])
def test_a_file_layer_with_parts_the_adapter_cannot_train_is_refused_not_dropped(algorithm):
    """LyCORIS writes a DoRA magnitude next to LoHa/LoKr/... weights; only LoRA reads it here, so
    continuing must fail with the key named rather than drop the magnitude silently."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 32))
    modules = dict(model.named_modules())
    state = AdapterNetwork.create([Target("0", model[0])], algorithm, 4, 2.0, seed=1).to_state_dict()
    assert AdapterNetwork.from_state_dict(modules, state)[1] == []  # its own keys read back whole
    state["diffusion_model.0.dora_scale"] = torch.ones(1, 16)
    with pytest.raises(ValueError, match=r"diffusion_model\.0 holds dora_scale"):
        AdapterNetwork.from_state_dict(modules, state)


def test_a_locon_layer_with_a_tucker_core_is_refused_with_a_message():
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1))
    state = {"diffusion_model.0.lora_down.weight": torch.zeros(4, 8, 1, 1),
             "diffusion_model.0.lora_mid.weight": torch.zeros(4, 4, 3, 3),
             "diffusion_model.0.lora_up.weight": torch.zeros(16, 4, 1, 1)}
    with pytest.raises(ValueError, match="lora_mid"):
        AdapterNetwork.from_state_dict(dict(model.named_modules()), state)


@pytest.mark.parametrize("layer_name", ["conv1x1", "conv3x3s2"])
def test_glora_stores_a_conv_layers_input_maps_as_1x1_convs_and_reads_the_flat_ones(layer_name):
    """LyCORIS stores a conv's a1/a2 as 1x1 convs and refuses the whole file when they are flat."""
    layer, adapter = _trained("glora", layer_name)
    saved = adapter.to_state_dict("x")
    assert saved["x.a1.weight"].shape == (8, 3, 1, 1) and saved["x.a2.weight"].shape == (3, 8, 1, 1)
    flat = {k[2:]: v.flatten(1) if k[2:4] == "a1" or k[2:4] == "a2" else v for k, v in saved.items()}
    for tensors in ({k[2:]: v for k, v in saved.items()}, flat):  # our files from before keep loading
        loaded = ALGORITHMS["glora"].from_state_dict(LayerSpec.of(layer), tensors)
        W = layer.weight.detach()
        torch.testing.assert_close(loaded.merged_weight(W, 1.0), adapter.merged_weight(W, 1.0))


@pytest.mark.parametrize("layer_name", ["linear", "conv3x3s2"])
def test_dora_takes_its_magnitude_from_an_fp8_stored_weight(layer_name):
    """Bases stored in fp8 (ComfyUI's fp8 weight dtypes) train in bypass mode; DoRA's magnitude is
    the base weight's column norm, taken in fp32 from the fp8 values."""
    layer, adapter = _make("dora", layer_name)
    stored = layer.weight.detach().to(torch.float8_e4m3fn)
    adapter.init_magnitude(stored)
    norm = torch.linalg.vector_norm(stored.float(), dim=adapter._norm_dims(), keepdim=True)
    torch.testing.assert_close(adapter.dora_scale.detach(), (norm + EPS).to(adapter.dora_scale))
