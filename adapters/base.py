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


def check_rank_and_groups(spec: LayerSpec, rank: int, algorithm: str) -> None:
    """The checks every low-rank algorithm makes on its layer; messages name the input."""
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if spec.groups != 1:
        raise ValueError(f"{algorithm} on grouped convolutions is not supported")


def conv_fn(dims: int):
    """torch.nn.functional's convolution for 1, 2 or 3 spatial dims."""
    return (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[dims - 1]


def apply_base_op(spec: LayerSpec, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Runs the base layer's operation (no bias) with an arbitrary weight of its shape."""
    if spec.kind == "linear":
        return torch.nn.functional.linear(x, weight)
    return conv_fn(spec.conv_dims)(x, weight, None, spec.stride, spec.padding, spec.dilation, spec.groups)


class Adapter(torch.nn.Module):
    """Base class: subclasses set ``algorithm`` and implement the methods below.

    The contract every algorithm keeps (and the tests check):
    - ``merged_weight(W, s)`` is the weight ComfyUI's own LoRA loader computes at strength ``s``;
    - ``bypass(x, base_out, module, s)`` equals the layer run with ``merged_weight(W, s)``, but
      computed from the base output without building a full-size weight where the math allows;
    - a freshly created adapter is an exact no-op.
    """

    algorithm: str = ""

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.spec = spec

    def set_alpha(self, value: float) -> None:
        """Stores alpha twice: as a buffer, which the saved file carries, and as a Python float,
        which the forward reads. Reading the buffer there (``float(tensor)``) would copy it back
        from the device, a GPU sync in every adapted layer's every forward."""
        self.alpha_value = float(value)
        self.register_buffer("alpha", torch.tensor(self.alpha_value), persistent=False)

    @classmethod
    def create(cls, spec: LayerSpec, rank: int, alpha: float, *, dtype=torch.float32, device=None,
               generator: torch.Generator | None = None, **options) -> "Adapter":
        """A fresh trainable adapter (an exact no-op) for a layer of this spec."""
        return cls(spec, rank, alpha, dtype=dtype, device=device, generator=generator, **options)

    @classmethod
    def from_state_dict(cls, spec: LayerSpec, tensors: dict[str, torch.Tensor], *, dtype=torch.float32,
                        device=None) -> "Adapter | None":
        """Rebuilds from one layer's tensors keyed by suffix (``lora_up.weight``, ``alpha`` ...);
        None when the tensors are not this algorithm's."""
        raise NotImplementedError

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The full-size weight change at strength 1."""
        raise NotImplementedError

    def merged_weight(self, base_weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """The layer weight with the adapter applied at ``strength`` (linear algorithms)."""
        delta = self.delta_weight(base_weight)
        return base_weight + (strength * delta).to(base_weight.dtype)

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's additive contribution to the output (algorithms with y = W x + f(x))."""
        raise NotImplementedError

    def bypass(self, x: torch.Tensor, base_out: torch.Tensor, module: torch.nn.Module,
               strength: float = 1.0) -> torch.Tensor:
        """The layer output with the adapter, given the base layer's own output for ``x``."""
        return base_out + self.forward_delta(x) * strength

    def to_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under ``prefix`` + the algorithm's standard key suffixes."""
        raise NotImplementedError

    @property
    def rank(self) -> int:
        raise NotImplementedError

    @property
    def transforms_base_output(self) -> bool:
        """Whether ``bypass`` transforms the base output ``W x`` itself (OFT's rotation) rather than
        adding to it: a trained bias offset must then be added after the adapter, as the loader's
        merged weight leaves biases unrotated."""
        return False

    @property
    def reads_base_weight(self) -> bool:
        """Whether ``bypass`` reads the layer's weight itself (in its own dtype) rather than working
        from the layer's output: training then keeps that weight as stored (see sampler/bf16_weights)."""
        return False
