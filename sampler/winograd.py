"""Frozen 3x3 convolutions by Winograd's F(2x2, 3x3): 16 multiplies per 2x2 output block, not 36.

A stride-1 3x3 conv makes each 2x2 block of its output from a 4x4 patch of its input. Winograd's
minimal filtering transforms the patch (V = B^T d B, 4x4) and the kernel (U = G g G^T, 4x4) so that
the block is A^T (U * V) A. Summed over input channels, the 16 elementwise products become 16
matmuls [out, in] @ [in, blocks]: 2.25x fewer multiplies than the direct conv, with the input and
output transforms as two thin matmuls and a reshuffle. The result matches the direct conv to fp32
rounding (the transforms only add, subtract and halve).

A frozen layer's input gradient is a 3x3 conv too, with the kernel flipped and its channel axes
swapped. For these transforms, flipping the kernel permutes U's 16 entries (G with its columns
reversed is G with rows 0 and 3 swapped), so the backward uses the same U, transposed, with
permuted input and output transforms: one U per layer serves the forward, any recompute and the
backward.

U is 16/9 of the weight's size and is computed once per training run, so a layer uses it only
where a call covers at least ``MIN_POSITIONS`` positions (images x height x width): the saving per
call grows with the positions, U's memory does not. It runs for fp32 on the CPU, where it is
measured against torch's own convolution once per call geometry per process (``winograd_is_faster``).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

from ..adapters.cpu_kernels import best_times

log = logging.getLogger("loralab")

# At 32 x 32 positions a call's 16 matmuls are 256 blocks wide, where they run near full speed and
# the saving per byte of U is largest; smaller maps save less per byte than U costs in memory.
# A 16 x 16 call is faster by Winograd too, but its wide-channel layers hold the largest U for the
# smallest saving per step, and building U per call instead of keeping it costs more than it saves.
MIN_POSITIONS = 1024
# Below this many input or output channels the transforms cost about as much as the multiplies they
# save (measured: 64 -> 320 and 320 -> 64 at 32 x 32 run no faster), so such layers are not probed.
MIN_CHANNELS = 64

_measured: dict[str, bool] = {}
# True inside ``direct_convs``: frozen convs run as torch's direct conv there.
_DIRECT_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("loralab_winograd_direct_only", default=False)

_B_T = ((1.0, 0.0, -1.0, 0.0), (0.0, 1.0, 1.0, 0.0), (0.0, -1.0, 1.0, 0.0), (0.0, 1.0, 0.0, -1.0))
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_A_T = ((1.0, 1.0, 1.0, 0.0), (0.0, 1.0, -1.0, -1.0))
# Row i of G applied to a reversed kernel equals row _FLIPPED[i] of G applied to the kernel.
_FLIPPED = (3, 1, 2, 0)


@functools.lru_cache(maxsize=1)
def _transforms() -> dict[str, torch.Tensor]:
    """The transforms as matrices on row-major flattened tiles: vec(L X R^T) = (L kron R) vec(X)."""
    b_t, g, a_t = (torch.tensor(m, dtype=torch.float64) for m in (_B_T, _G, _A_T))
    inputs, outputs = torch.kron(b_t, b_t), torch.kron(a_t, a_t)  # [16, 16], [4, 16]
    flip = [4 * _FLIPPED[i] + _FLIPPED[j] for i in range(4) for j in range(4)]
    return {"kernel": torch.kron(g, g),  # [16, 9], kept in float64 until U is built
            "inputs": inputs.float(), "outputs": outputs.float(),
            "inputs_flipped": inputs[flip].float(), "outputs_flipped": outputs[:, flip].float()}


def fits(module: torch.nn.Module) -> bool:
    """Whether a layer is a conv this computes: 2-D 3x3, stride 1, no dilation or groups, zero
    padding of at most 2 (so the input gradient's padding, 2 - p, is not negative)."""
    return (isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (3, 3)
            and tuple(module.stride) == (1, 1) and tuple(module.dilation) == (1, 1) and module.groups == 1
            and not isinstance(module.padding, str) and all(0 <= p <= 2 for p in module.padding)
            and module.padding_mode == "zeros")


def kernel_transform(weight: torch.Tensor) -> torch.Tensor:
    """U = G g G^T for every (out, in) kernel of ``weight`` [O, C, 3, 3]: [16, O, C], in fp32."""
    out_ch, in_ch = weight.shape[:2]
    taps = weight.detach().permute(2, 3, 0, 1).reshape(9, out_ch * in_ch).double()
    return (_transforms()["kernel"] @ taps).float().view(16, out_ch, in_ch).contiguous()


def _tiled_conv(x: torch.Tensor, u: torch.Tensor, padding: tuple[int, int], inputs: torch.Tensor,
                outputs: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 3x3 "valid" conv of ``x`` [N, C, H, W] zero-padded by ``padding``, through the transformed
    kernels ``u`` [16, O, C]: [N, O, H + 2 p - 2, W + 2 p - 2]."""
    n, channels, height, width = x.shape
    out_h, out_w = height + 2 * padding[0] - 2, width + 2 * padding[1] - 2
    rows, cols = -(-out_h // 2), -(-out_w // 2)  # 2x2 blocks; an odd edge is padded, then cut
    padded = F.pad(x, (padding[1], padding[1] + 2 * cols - out_w, padding[0], padding[0] + 2 * rows - out_h))
    tiles = padded.unfold(2, 4, 2).unfold(3, 4, 2)  # [N, C, rows, cols, 4, 4], overlapping views
    blocks = n * rows * cols
    d = tiles.permute(4, 5, 1, 0, 2, 3).reshape(16, channels * blocks)
    v = (inputs @ d).view(16, channels, blocks)
    m = torch.bmm(u, v)  # [16, O, blocks]
    out_ch = m.shape[1]
    y = (outputs @ m.view(16, out_ch * blocks)).view(2, 2, out_ch, n, rows, cols)
    out = torch.empty(n, out_ch, 2 * rows, 2 * cols, dtype=x.dtype, device=x.device)
    placed = y.permute(3, 2, 4, 0, 5, 1)  # [N, O, rows, 2, cols, 2]
    if bias is None:
        out.view(placed.shape).copy_(placed)
    else:
        torch.add(placed, bias.view(1, out_ch, 1, 1, 1, 1), out=out.view(placed.shape))
    if (2 * rows, 2 * cols) != (out_h, out_w):
        out = out[:, :, :out_h, :out_w].contiguous()
    return out


def winograd_conv(x: torch.Tensor, u: torch.Tensor, padding: tuple[int, int],
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(x, weight, bias, padding=padding)`` for a 3x3 weight with U = kernel_transform(weight)."""
    t = _transforms()
    return _tiled_conv(x, u, padding, t["inputs"], t["outputs"], bias)


def winograd_input_grad(grad_out: torch.Tensor, u: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """The input gradient of ``winograd_conv`` (a 3x3 conv with the flipped, transposed kernel)."""
    t = _transforms()
    return _tiled_conv(grad_out, u.transpose(1, 2), (2 - padding[0], 2 - padding[1]),
                       t["inputs_flipped"], t["outputs_flipped"], None)


@functools.lru_cache(maxsize=None)
def winograd_is_faster(batch: int, in_channels: int, out_channels: int, height: int, width: int,
                       padding: tuple[int, int]) -> bool:
    """True when this module's conv beats torch's on this CPU for one call geometry, and gives the
    same result. Measured once per geometry per process (a tenth of a second at 32 x 32, about a
    second at 64 x 64 with 960 channels), outside any dispatch mode that is active when a layer first
    asks (a FLOP counter): it does not see the probe.

    Per geometry, because the answer changes with it: few channels leave the transforms as most of
    the work, and at 64 x 64 the transforms' buffers are large enough that fresh pages for them cost
    more than the multiplies saved (measured on the bench CPU: at 32 x 32, 1.04-1.2x faster with 320
    channels and 1.5x with 640; at 64 x 64 with 320 channels, 0.94x)."""
    generator = torch.Generator().manual_seed(0)
    with _disable_current_modes(), torch.no_grad():
        x = torch.randn(batch, in_channels, height, width, generator=generator)
        weight = torch.randn(out_channels, in_channels, 3, 3, generator=generator) / math.sqrt(in_channels * 9)
        u = kernel_transform(weight)

        def direct():
            return F.conv2d(x, weight, padding=padding)

        def transformed():
            return winograd_conv(x, u, padding)

        same = torch.allclose(transformed(), direct(), rtol=1e-4, atol=1e-4)
        direct_s, winograd_s = best_times(direct, transformed, repeats=3)
    faster = same and winograd_s < 0.9 * direct_s
    geometry = f"{in_channels}->{out_channels} channels at {height}x{width}, batch {batch}, padding {padding[0]}x{padding[1]}"
    _measured[geometry] = faster
    log.info("LoRA Lab: frozen 3x3 conv, %s: %s (Winograd %.2f ms, direct %.2f ms%s)", geometry,
             "Winograd" if faster else "direct", winograd_s * 1e3, direct_s * 1e3, "" if same else ", results differ")
    return faster


@contextlib.contextmanager
def direct_convs():
    """Inside this block frozen convs run as torch's direct conv, whatever the probes chose.

    For a pass that prices work by counting its FLOPs (the checkpoint plan's measuring forward):
    Winograd's count is 16/36 of the direct conv's, and whether it runs depends on a timing probe,
    so without this the plan, and the run's memory with it, could change from one process to the
    next on the same model and settings."""
    token = _DIRECT_ONLY.set(True)
    try:
        yield
    finally:
        _DIRECT_ONLY.reset(token)


def measured_choices() -> dict[str, bool]:
    """Each call geometry this process has measured, and whether Winograd computes it."""
    return dict(_measured)


class WinogradWeights:
    """A frozen 3x3 conv's U, built on first use and kept while the layer trains (see ``fits``).

    ``applies(x)`` says whether a call on ``x`` computes here: fp32 on the CPU, with at least
    MIN_POSITIONS positions and MIN_CHANNELS channels each way, outside ``direct_convs``, where the
    probe for its geometry measured Winograd faster (the caller makes sure the weight is used as
    stored, not a cast copy).
    U is rebuilt if the weight's storage or version changes (a patch applied in place)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self._u: torch.Tensor | None = None
        self._stamp: tuple | None = None

    def applies(self, x: torch.Tensor) -> bool:
        if _DIRECT_ONLY.get():
            return False
        weight = self.module.weight
        if not (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
                and x.ndim == 4):
            return False
        batch, channels, height, width = x.shape
        out_channels = weight.shape[0]
        return (batch * height * width >= MIN_POSITIONS and min(channels, out_channels) >= MIN_CHANNELS
                and winograd_is_faster(batch, channels, out_channels, height, width, tuple(self.module.padding)))

    def u(self) -> torch.Tensor:
        weight = self.module.weight
        stamp = (weight.data_ptr(), weight._version, weight.shape)
        if self._stamp != stamp:
            self._u, self._stamp = kernel_transform(weight), stamp
        return self._u

    def conv(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return winograd_conv(x, self.u(), tuple(self.module.padding), bias)

    def input_grad(self, grad_out: torch.Tensor) -> torch.Tensor:
        return winograd_input_grad(grad_out, self.u(), tuple(self.module.padding))
