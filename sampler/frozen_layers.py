"""Frozen base layers for training: the layer's own output and input gradient, at less cost.

The base weights never train, so a frozen layer's backward needs its weight and nothing else
(grad_in = grad_out @ W for a Linear, a transposed convolution for a Conv). torch's linear and
convolution keep their input for a weight gradient that is never taken, and a layer whose
weights ComfyUI casts on the fly (fp8 storage, offloading, 16-bit compute) keeps the cast copy
until the backward. Here a frozen layer keeps nothing: the backward fetches the weight again,
cast again where it was cast, so a cast copy lives only while its matmul runs.

Keeping nothing also makes gradient checkpointing cheaper: its recompute stops as soon as every
tensor the backward needs is back, so layers at the end of a checkpointed piece that nothing
after them needs (a ResBlock's second conv and its skip conv) are not recomputed at all. And a
Linear that narrows its input a lot (a feed-forward's output layer, 4C -> C) keeps its output
from a checkpointed piece's forward for its recompute, where that is worth the memory (see
recompute_reuse).

On CPUs, a frozen Linear's fp32 forward and backward run on whichever matmul kernel measured
faster here, torch's default (MKL) or oneDNN (see adapters/cpu_kernels).
A frozen 3x3 conv over a large enough map runs fp32 on the CPU by Winograd's F(2x2, 3x3), forward
and input gradient alike, where that measured faster here for the call's geometry (see winograd).

Layers with a trainable weight, with ComfyUI weight functions (weight-wrapper adapters, LoRAs
patched in low-VRAM mode) or with string padding run their own forward, unchanged.
"""
from __future__ import annotations

import math

import torch

from ..adapters.attach import own_forward
from ..adapters.base import conv_fn
from ..adapters.cpu_kernels import onednn_linear, onednn_matmul_is_faster
from .recompute_reuse import reuse_in_recompute
from .winograd import WinogradWeights, fits as winograd_fits

CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
FROZEN_KEY = "loralab_frozen_layers"


class LayerWeights:
    """Where a frozen layer's weight and bias come from, in the forward and again in the backward:
    as stored, or cast to the compute dtype and device (by ComfyUI's own cast where the layer
    casts). ``fetch`` returns (weight, bias, release); call release once the matmul is done."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype, device: torch.device,
                 winograd: WinogradWeights | None = None):
        self.module, self.dtype, self.device, self.winograd = module, dtype, device, winograd
        self.comfy_cast = bool(getattr(module, "comfy_cast_weights", False))

    def winograd_for(self, x: torch.Tensor) -> WinogradWeights | None:
        """The layer's Winograd conv where it applies to a call on ``x``: the weight is used as
        stored (``fetch`` casts nothing), so its kept transform stays valid (see sampler/winograd)."""
        as_stored = not self.comfy_cast and self.module.weight.dtype == self.dtype
        return self.winograd if self.winograd is not None and as_stored and self.winograd.applies(x) else None

    def fetch(self):
        module = self.module
        if self.comfy_cast:
            import comfy.ops
            weight, bias, stream = comfy.ops.cast_bias_weight(module, None, dtype=self.dtype, device=self.device,
                                                              bias_dtype=self.dtype, offloadable=True)
            return weight, bias, lambda: comfy.ops.uncast_bias_weight(module, weight, bias, stream)
        weight, bias = module.weight, module.bias
        if weight.dtype != self.dtype:  # autocast: cast as autocast would
            weight = weight.to(self.dtype)
            bias = None if bias is None else bias.to(self.dtype)
        return weight, bias, _nothing


def _nothing():
    return None


def _with_offset(bias: torch.Tensor | None, offset: torch.Tensor | None) -> torch.Tensor | None:
    """The layer's bias plus a trainable bias offset, fed to the op as one bias: the offset costs no
    full-size add in the forward (nor in a checkpointed piece's recompute)."""
    if offset is None:
        return bias
    return offset if bias is None else bias + offset


def _offset_grad(grad_out: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """A bias's gradient: the output gradient summed over everything but the channel axis."""
    return grad_out.sum(dim=[d for d in range(grad_out.ndim) if d != channel_dim % grad_out.ndim])


def _matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool) -> torch.Tensor:
    """x @ weight.T + bias for a weight [out, in] (which may be a transposed view)."""
    if onednn:
        return onednn_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer: LayerWeights, onednn: bool, bias_offset: torch.Tensor | None):
        ctx.layer, ctx.onednn = layer, onednn

        def compute():
            weight, bias, release = layer.fetch()
            out = _matmul(x, weight, _with_offset(bias, bias_offset), onednn)
            release()
            return out

        out_features, in_features = layer.module.weight.shape
        rows = x.numel() // in_features
        out = reuse_in_recompute(compute, 2 * rows * in_features * out_features,
                                 rows * out_features * x.element_size())
        # torch's linear returns a 3-D input's output as a view of its 2-D product. A custom Function
        # whose output is a view forbids modifying that output in place (Flux adds to its layers'
        # outputs: ``img += ...``); the same tensor detached is no view and copies nothing.
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        grad_offset = _offset_grad(grad_out, -1) if ctx.needs_input_grad[3] else None
        if not ctx.needs_input_grad[0]:
            return None, None, None, grad_offset
        weight, _, release = ctx.layer.fetch()
        grad_in = _matmul(grad_out, weight.t(), None, ctx.onednn)
        release()
        return grad_in, None, None, grad_offset


def _conv_output_shape(shape, module) -> tuple[int, ...]:
    """The output shape of ``module`` (numeric padding) for an input of ``shape``."""
    spatial = [(size + 2 * pad - dil * (k - 1) - 1) // stride + 1 for size, pad, dil, k, stride in
               zip(shape[2:], module.padding, module.dilation, module.kernel_size, module.stride)]
    return (shape[0], module.out_channels, *spatial)


def _conv(x, weight, bias, module):
    return conv_fn(weight.ndim - 2)(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)


class _FrozenConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer: LayerWeights, bias_offset: torch.Tensor | None):
        winograd = layer.winograd_for(x)
        ctx.layer, ctx.input_shape, ctx.winograd = layer, x.shape, winograd  # the backward follows the forward's choice

        def compute():
            weight, bias, release = layer.fetch()
            bias = _with_offset(bias, bias_offset)
            out = winograd.conv(x, bias) if winograd is not None else _conv(x, weight, bias, layer.module)
            release()
            return out

        weight = layer.module.weight  # [out, in / groups, *kernel]
        out_shape = _conv_output_shape(x.shape, layer.module)
        positions = math.prod(out_shape[2:]) * out_shape[0]
        # Priced as the direct conv even where Winograd runs it: keeping fewer conv outputs for a
        # cheaper conv measured slower, as a recompute also reruns what feeds the conv.
        flops = 2 * positions * weight.numel()
        return reuse_in_recompute(compute, flops, math.prod(out_shape) * x.element_size())

    @staticmethod
    def backward(ctx, grad_out):
        grad_offset = _offset_grad(grad_out, 1) if ctx.needs_input_grad[2] else None
        if not ctx.needs_input_grad[0]:
            return None, None, grad_offset
        if ctx.winograd is not None:
            return ctx.winograd.input_grad(grad_out), None, grad_offset
        module = ctx.layer.module
        weight, _, release = ctx.layer.fetch()
        # Only the input's shape is read: an expanded one-element tensor stands in for it.
        stand_in = grad_out.new_empty(1).expand(ctx.input_shape)
        grad_in = torch.ops.aten.convolution_backward(
            grad_out.contiguous(), stand_in, weight, None, module.stride, module.padding, module.dilation, False,
            [0] * len(module.stride), module.groups, (True, False, False))[0]
        release()
        return grad_in, None, grad_offset


def _compute_dtype(module: torch.nn.Module, x: torch.Tensor) -> torch.dtype | None:
    """The dtype the layer computes ``x`` in, or None where the frozen path does not apply."""
    if type(x) is not torch.Tensor or getattr(module, "weight_function", None) or getattr(module, "bias_function", None):
        return None
    weight, bias = module.weight, module.bias
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return None
    if isinstance(module, CONVS) and (isinstance(module.padding, str) or module.padding_mode != "zeros"):
        return None
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    if getattr(module, "comfy_cast_weights", False):
        return x.dtype  # ComfyUI casts the weights to the input's dtype
    if weight.dtype != x.dtype or weight.device != x.device:
        return None  # let the layer's own forward report the mismatch
    return x.dtype


def frozen_forward(module: torch.nn.Module):
    """The base forward of a Linear or Conv layer as a training run should call it: through the
    frozen-layer path where it applies (see ``_compute_dtype``), else the layer's own forward.
    ``output_bias`` (a trainable bias offset, see adapters.offsets) joins the layer's bias."""
    own = own_forward(module)
    if not isinstance(module, (torch.nn.Linear, *CONVS)):
        return own
    linear = isinstance(module, torch.nn.Linear)
    winograd = WinogradWeights(module) if winograd_fits(module) else None  # U is kept per attach

    def forward(module, x, *args, output_bias: torch.Tensor | None = None, **kwargs):
        dtype = None if args or kwargs else _compute_dtype(module, x)
        if dtype is None:
            return own(module, x, *args, output_bias=output_bias, **kwargs)
        layer = LayerWeights(module, dtype, x.device, winograd)
        x = x.to(dtype)
        offset = None if output_bias is None else output_bias.to(dtype)
        if linear:
            onednn = x.device.type == "cpu" and dtype == torch.float32 and onednn_matmul_is_faster()
            return _FrozenLinear.apply(x, layer, onednn, offset)
        return _FrozenConv.apply(x, layer, offset)
    return forward


def attach_frozen_layers(model_patcher, skip: set[str] = frozenset()) -> int:
    """Runs every Linear and Conv layer of the diffusion model that has no adapter hook (``skip``)
    through ``frozen_forward`` while the patcher is loaded; returns how many layers."""
    from comfy.patcher_extension import PatcherInjection
    layers = [name for name, m in model_patcher.model.diffusion_model.named_modules()
              if isinstance(m, (torch.nn.Linear, *CONVS)) and name not in skip]

    def inject(mp):
        dm = mp.model.diffusion_model
        for name in layers:
            module = dm.get_submodule(name)
            forward = frozen_forward(module)
            module.forward = lambda *args, _m=module, _f=forward, **kwargs: _f(_m, *args, **kwargs)

    def eject(mp):
        dm = mp.model.diffusion_model
        for name in layers:
            dm.get_submodule(name).__dict__.pop("forward", None)

    model_patcher.set_injections(FROZEN_KEY, [PatcherInjection(inject=inject, eject=eject)])
    return len(layers)
