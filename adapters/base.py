"""The protocol every adapter algorithm implements, and the layer facts it needs.

An adapter is a small trainable module attached to one base layer (Linear or Conv). It can
express itself two ways:
- ``delta_weight()``: the full-size change to the base weight (weight-wrapper mode, and saving
  merged weights);
- ``forward_delta(x)``: its contribution to the layer output, ``y = base(x) + f(x)``, computed
  without building the full-size weight (bypass mode, the fast path for training).
Both must agree: ``base(x) + forward_delta(x) == layer_with(W + delta_weight())(x)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerSpec:
    """Shape and call facts of a base layer, enough to build and run an adapter for it."""

    kind: str  # "linear" or "conv"
    in_features: int
    out_features: int
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @property
    def conv_dims(self) -> int:
        return len(self.kernel_size)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.out_features, self.in_features)
        return (self.out_features, self.in_features // self.groups, *self.kernel_size)

    @classmethod
    def of(cls, module: torch.nn.Module) -> "LayerSpec":
        """Reads the spec off a torch Linear or Conv1d/2d/3d (ComfyUI's ops subclass these)."""
        if isinstance(module, torch.nn.Linear):
            return cls("linear", module.in_features, module.out_features)
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            return cls(
                "conv",
                module.in_channels,
                module.out_channels,
                tuple(module.kernel_size),
                tuple(module.stride),
                module.padding if isinstance(module.padding, str) else tuple(module.padding),
                tuple(module.dilation),
                module.groups,
            )
        raise TypeError(f"adapters support Linear and Conv layers, not {type(module).__name__}")


def conv_fn(dims: int):
    """torch.nn.functional's convolution for 1, 2 or 3 spatial dims."""
    return (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[dims - 1]


def apply_base_op(spec: LayerSpec, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Runs the base layer's operation (no bias) with an arbitrary weight of its shape."""
    if spec.kind == "linear":
        return torch.nn.functional.linear(x, weight)
    return conv_fn(spec.conv_dims)(x, weight, None, spec.stride, spec.padding, spec.dilation, spec.groups)


class Adapter(torch.nn.Module):
    """Base class: subclasses set ``algorithm`` and implement the methods below."""

    algorithm: str = ""

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.spec = spec

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under ``prefix`` + the algorithm's standard key suffixes."""
        raise NotImplementedError

    @property
    def rank(self) -> int:
        raise NotImplementedError
