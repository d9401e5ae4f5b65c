"""What DiTs (Flux, SD3) need from the pack, checked without running a model: which layers the target
presets pick on the real architectures' layer names, frozen Linear outputs that a block may add to
in place, and the guards for blocks that modify tensors autograd saved (sampler/inplace_guard)."""
import re

import pytest
import torch

from devkit.tiny_dit import layer_names
from loralab.adapters.targets import DEFAULT_PRESET, select_targets
from loralab.sampler import frozen_layers
from loralab.sampler.frozen_layers import frozen_forward
from loralab.sampler.inplace_guard import InputCopies, NormGuard, observing


@pytest.fixture(scope="module")
def models():
    """Full-size diffusion models, on the meta device: only their layer names matter here."""
    return {arch: layer_names(arch)[""] for arch in ("sd15", "sdxl", "sd3", "flux")}


def _picked(model, preset):
    return [t.name for t in select_targets(model, preset)]


def _kinds(names):
    """Names with block indices replaced by N: the kinds of layer picked."""
    return sorted({re.sub(r"\.\d+\.", ".N.", n) for n in names})


def test_flux_presets_pick_the_blocks_attention_and_mlp(models):
    flux = models["flux"]
    default = _picked(flux, DEFAULT_PRESET)
    assert _kinds(default) == [
        "double_blocks.N.img_attn.proj", "double_blocks.N.img_attn.qkv", "double_blocks.N.img_mlp.0",
        "double_blocks.N.img_mlp.2", "double_blocks.N.txt_attn.proj", "double_blocks.N.txt_attn.qkv",
        "double_blocks.N.txt_mlp.0", "double_blocks.N.txt_mlp.2", "single_blocks.N.linear1", "single_blocks.N.linear2"]
    assert len(default) == 19 * 8 + 38 * 2
    # single blocks fuse attention and MLP in linear1/linear2: they are the single blocks' attention
    attention = _picked(flux, "attention")
    assert _kinds(attention) == [
        "double_blocks.N.img_attn.proj", "double_blocks.N.img_attn.qkv", "double_blocks.N.txt_attn.proj",
        "double_blocks.N.txt_attn.qkv", "single_blocks.N.linear1", "single_blocks.N.linear2"]
    # embedders, in/out layers and modulation layers only with "all linear"
    everything = _picked(flux, "all linear")
    assert {"img_in", "txt_in", "time_in.in_layer", "vector_in.out_layer", "guidance_in.in_layer",
            "final_layer.linear", "double_blocks.0.img_mod.lin", "single_blocks.0.modulation.lin"} <= set(everything)


def test_sd3_default_leaves_the_embedders_out(models):
    default = _picked(models["sd3"], DEFAULT_PRESET)
    assert _kinds(default) == [
        "joint_blocks.N.context_block.attn.proj", "joint_blocks.N.context_block.attn.qkv",
        "joint_blocks.N.context_block.mlp.fc1", "joint_blocks.N.context_block.mlp.fc2",
        "joint_blocks.N.x_block.attn.proj", "joint_blocks.N.x_block.attn.qkv",
        "joint_blocks.N.x_block.mlp.fc1", "joint_blocks.N.x_block.mlp.fc2"]
    everything = _picked(models["sd3"], "all linear")
    assert {"t_embedder.mlp.0", "y_embedder.mlp.2", "context_embedder", "final_layer.linear"} <= set(everything)


# A UNet transformer block's layers, and the transformer's own 1x1 / linear projections.
UNET_ATTENTION = re.compile(r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
UNET_FEED_FORWARD = re.compile(r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$")
UNET_PROJ = re.compile(r"\.\d+\.(proj_in|proj_out)$")


@pytest.mark.parametrize("arch,blocks,transformers", [("sd15", 16, 16), ("sdxl", 70, 11)])
def test_unet_presets_are_unchanged(models, arch, blocks, transformers):
    """SD1.5 and SDXL: each transformer block's 8 attention and 2 feed-forward layers, plus each
    spatial transformer's proj_in/proj_out, as before DiT support."""
    default = _picked(models[arch], DEFAULT_PRESET)
    assert len(default) == 10 * blocks + 2 * transformers
    assert all(UNET_ATTENTION.search(n) or UNET_FEED_FORWARD.search(n) or UNET_PROJ.search(n) for n in default)
    attention = _picked(models[arch], "attention")
    assert len(attention) == 8 * blocks and all(UNET_ATTENTION.search(n) for n in attention)


@pytest.mark.parametrize("onednn", [False, True], ids=["torch kernel", "oneDNN kernel"])
def test_frozen_linear_output_can_be_added_to_in_place(onednn, monkeypatch):
    """Flux adds to a Linear's output in place (``img += proj(...)``): the frozen path's output of a
    3-D input must allow it, with the same values and input gradient as torch's Linear."""
    if onednn and not torch.backends.mkldnn.is_available():
        pytest.fail("this torch has no oneDNN; the oneDNN path cannot be checked")
    monkeypatch.setattr(frozen_layers, "onednn_matmul_is_faster", lambda: onednn)
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 16).requires_grad_(False)
    frozen = frozen_forward(layer)
    x, add, grad = torch.randn(2, 5, 24), torch.randn(2, 5, 16), torch.randn(2, 5, 16)

    def run(forward):
        leaf = x.clone().requires_grad_(True)
        out = forward(leaf * 2)  # a non-leaf input, as inside a model
        out += add
        out.backward(grad)
        return out.detach(), leaf.grad

    got, expected = run(lambda t: frozen(layer, t)), run(layer)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class _AddsToInput(torch.nn.Module):
    """A block as Flux writes them: normalises its input, then adds to that input in place."""

    def __init__(self, width=8):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width, elementwise_affine=False)
        self.lin = torch.nn.Linear(width, width)

    def forward(self, x):
        x += self.lin(self.norm(x))
        return x


class _Residual(_AddsToInput):
    def forward(self, x):
        return x + self.lin(self.norm(x))


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_AddsToInput(), _Residual()])
        self.scale = torch.nn.Parameter(torch.ones(8))  # what training trains, before the blocks

    def forward(self, x):
        x = x * self.scale
        for block in self.blocks:
            x = block(x)
        return x


def _guarded(model: _Model) -> NormGuard:
    guard = NormGuard(model)
    for name in guard.guarded():
        module = model.get_submodule(name)
        module.forward = guard.forward_of(name, module)
    guard.start_learning(model)
    return guard


def _scale_grad(model, x):
    model.scale.grad = None
    model(x).square().sum().backward()
    return model.scale.grad.clone()


def test_norm_guard_copies_only_the_input_a_block_adds_to():
    torch.manual_seed(0)
    model, x = _Model(), torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _scale_grad(model, x)  # what Flux's blocks do to autograd
    guard = _guarded(model)
    with torch.no_grad():
        model(x)  # a forward without grad teaches nothing
    assert guard.modified is None
    first, second = _scale_grad(model, x), _scale_grad(model, x)
    assert guard.modified == {"blocks.0.norm"}
    assert "forward" in model.blocks[0].norm.__dict__ and "forward" not in model.blocks[1].norm.__dict__
    torch.testing.assert_close(first, second)
    # the same gradient as the block written without the in-place add
    plain = _Model()
    plain.load_state_dict(model.state_dict())
    plain.blocks[0].forward = lambda t, b=plain.blocks[0]: t + b.lin(b.norm(t))
    torch.testing.assert_close(first, _scale_grad(plain, x))


def test_norm_guard_learns_from_an_observed_forward_without_copying(monkeypatch):
    model, x = _Model(), torch.randn(3, 8)
    guard = _guarded(model)
    clones = []
    real_clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: clones.append(t.shape) or real_clone(t, *a, **k))
    with observing():
        model(x)  # never back-propagated: nothing to protect
    assert clones == [] and guard.modified == {"blocks.0.norm"}
    model(x).sum().backward()
    assert len(clones) == 1  # the block that adds to its input, only


def test_checkpointed_piece_runs_on_a_copy_of_the_input_it_modifies():
    torch.manual_seed(0)
    adds, residual = _AddsToInput(), _Residual()
    for block in (adds, residual):
        block.norm.forward = lambda t, n=block.norm: torch.nn.LayerNorm.forward(n, t.clone())  # not this test's subject
    copies = InputCopies()
    x = torch.randn(3, 8)

    def loss(checkpointed):
        leaf = x.clone().requires_grad_(True)
        h = leaf * 2
        out = h
        for name, block in (("adds", adds), ("residual", residual)):
            out = checkpointed(name, block, out) if checkpointed else block(out)
        out.square().sum().backward()
        return leaf.grad

    def checkpointed(name, block, t):
        return torch.utils.checkpoint.checkpoint(copies.wrap(name, block.forward), t, use_reentrant=False)

    expected = loss(None)
    for _ in range(2):  # the first call learns on copies of everything, the second copies only x
        torch.testing.assert_close(loss(checkpointed), expected)
    assert copies.modified == {"adds": frozenset({0}), "residual": frozenset()}
    assert copies.wrap("residual", residual.forward) == residual.forward  # nothing to copy: no wrapper

    observed = InputCopies()
    t = torch.randn(3, 8)
    with torch.no_grad():
        observed.observe("adds", adds.forward, (t,), {})
        observed.observe("residual", residual.forward, (t,), {})
    assert observed.modified == copies.modified
