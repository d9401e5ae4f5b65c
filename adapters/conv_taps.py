"""A stride-1 2-D convolution with few output channels, as one matmul and shifted sums.

A k x k conv with ``r`` output channels sums, for each of its k*k taps, an [r, C] matrix applied
to the input shifted by that tap's offset. Applying all taps' matrices at once is one matmul with
k*k*r outputs ([k*k*r, C] @ [C, H*W]); the conv's output is then the sum of the shifted [r, H, W]
slices of that product. For a LoRA down projection (r = 8) the matmul has enough outputs to run
at full speed, where oneDNN's convolution, built for many output channels, does not.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .base import LayerSpec


def fits(spec: LayerSpec) -> bool:
    """Whether a layer is a conv ``ConvTaps`` computes: 2-D, stride 1, ungrouped, numeric padding."""
    return (spec.kind == "conv" and spec.conv_dims == 2 and all(s == 1 for s in spec.stride)
            and spec.groups == 1 and not isinstance(spec.padding, str))


@dataclass(frozen=True)
class ConvTaps:
    """Where each tap of a stride-1 2-D conv reads, for an input of ``height`` x ``width``."""

    kernel_size: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    height: int
    width: int

    @classmethod
    def of(cls, spec: LayerSpec, x: torch.Tensor) -> "ConvTaps":
        """The taps of ``spec``'s conv (see ``fits``) over the input ``x`` [B, C, H, W]."""
        return cls(spec.kernel_size, spec.padding, spec.dilation, *x.shape[2:])

    @property
    def count(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def out_size(self) -> tuple[int, int]:
        return tuple(n + 2 * p - d * (k - 1) for n, p, d, k in
                     zip((self.height, self.width), self.padding, self.dilation, self.kernel_size))

    @functools.cached_property
    def _windows(self) -> tuple:
        """Per tap: (tap, output rows, output cols, input rows, input cols) slices it connects;
        worked out once for the forward, the backward and a checkpointed recompute."""
        return tuple(self._tap_windows())

    def _tap_windows(self):
        out_h, out_w = self.out_size
        for i in range(self.kernel_size[0]):
            for j in range(self.kernel_size[1]):
                dy = i * self.dilation[0] - self.padding[0]
                dx = j * self.dilation[1] - self.padding[1]
                y0, y1 = max(0, -dy), min(out_h, self.height - dy)
                x0, x1 = max(0, -dx), min(out_w, self.width - dx)
                if y0 < y1 and x0 < x1:
                    yield (i * self.kernel_size[1] + j, slice(y0, y1), slice(x0, x1),
                           slice(y0 + dy, y1 + dy), slice(x0 + dx, x1 + dx))

    def stacked_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """[r, C * k*k] (a conv weight flattened) -> [k*k * r, C], tap-major: one matmul for all taps."""
        rank = weight.shape[0]
        return weight.reshape(rank, -1, self.count).permute(2, 0, 1).reshape(self.count * rank, -1)

    def gather(self, per_tap: torch.Tensor) -> torch.Tensor:
        """[k*k * r, H*W] (every tap's matrix applied at every input position) -> the conv output
        [r, out_h * out_w]: each output position sums its taps' values at the shifted positions."""
        rank = per_tap.shape[0] // self.count
        per_tap = per_tap.view(self.count, rank, self.height, self.width)
        out = per_tap.new_zeros(rank, *self.out_size)
        for tap, out_y, out_x, in_y, in_x in self._windows:
            out[:, out_y, out_x] += per_tap[tap, :, in_y, in_x]
        return out.view(rank, -1)

    def scatter(self, grad_out: torch.Tensor) -> torch.Tensor:
        """The transpose of ``gather``: the output gradient [r, out_h * out_w] -> the gradient of the
        per-tap product [k*k * r, H*W]."""
        rank = grad_out.shape[0]
        grad_out = grad_out.view(rank, *self.out_size)
        grad = grad_out.new_zeros(self.count, rank, self.height, self.width)
        for tap, out_y, out_x, in_y, in_x in self._windows:
            grad[tap, :, in_y, in_x] = grad_out[:, out_y, out_x]
        return grad.view(self.count * rank, -1)
