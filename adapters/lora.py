"""LoRA: W' = W + (alpha / rank) * up @ down.

``down`` maps the layer input to ``rank`` features (for a conv it is a conv with the base
kernel, stride and padding); ``up`` maps back (a 1x1 conv for convs). ``up`` starts at zero, so a
fresh adapter changes nothing: step 0 reproduces the base model exactly.
"""
from __future__ import annotations

import math

import torch

from .base import Adapter, LayerSpec, conv_fn


class LoRAAdapter(Adapter):
    algorithm = "lora"

    def __init__(self, spec: LayerSpec, rank: int, alpha: float, *, dtype=torch.float32,
                 device=None, generator: torch.Generator | None = None):
        super().__init__(spec)
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        in_dim = spec.in_features // spec.groups
        down_shape = (rank, in_dim, *spec.kernel_size)
        up_shape = (spec.out_features, rank, *([1] * spec.conv_dims))
        down = torch.empty(down_shape, dtype=torch.float32)
        fan_in = in_dim * math.prod(spec.kernel_size)
        bound = 1.0 / math.sqrt(fan_in)  # kaiming-uniform with a=sqrt(5), as torch inits layers
        down.uniform_(-bound, bound, generator=generator)
        self.lora_down = torch.nn.Parameter(down.to(device=device, dtype=dtype))
        self.lora_up = torch.nn.Parameter(torch.zeros(up_shape, device=device, dtype=dtype))
        self.register_buffer("alpha", torch.tensor(float(alpha)), persistent=False)
        if spec.groups != 1:
            raise ValueError("LoRA on grouped convolutions is not supported")

    @classmethod
    def from_tensors(cls, spec: LayerSpec, up: torch.Tensor, down: torch.Tensor, alpha: float | None,
                     *, dtype=torch.float32, device=None) -> "LoRAAdapter":
        """Rebuilds an adapter from saved up/down matrices (any layout that reshapes to ours)."""
        rank = down.shape[0]
        adapter = cls(spec, rank, float(rank if alpha is None else alpha), dtype=dtype, device=device)
        with torch.no_grad():
            adapter.lora_down.copy_(down.reshape(adapter.lora_down.shape).to(dtype))
            adapter.lora_up.copy_(up.reshape(adapter.lora_up.shape).to(dtype))
        return adapter

    @classmethod
    def from_state_dict(cls, spec: LayerSpec, tensors: dict[str, torch.Tensor], *, dtype=torch.float32,
                        device=None) -> "LoRAAdapter | None":
        if "lora_up.weight" not in tensors or "lora_down.weight" not in tensors:
            return None
        alpha = tensors.get("alpha")
        return cls.from_tensors(spec, tensors["lora_up.weight"], tensors["lora_down.weight"],
                                None if alpha is None else float(alpha), dtype=dtype, device=device)

    @property
    def rank(self) -> int:
        return self.lora_down.shape[0]

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        up = self.lora_up.flatten(1)
        down = self.lora_down.flatten(1)
        return (self.scale * (up @ down)).reshape(self.spec.weight_shape)

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        down = self.lora_down.to(x.dtype)
        up = self.lora_up.to(x.dtype)
        spec = self.spec
        if spec.kind == "linear":
            hidden = torch.nn.functional.linear(x, down)
            return torch.nn.functional.linear(hidden, up) * self.scale
        conv = conv_fn(spec.conv_dims)
        hidden = conv(x, down, None, spec.stride, spec.padding, spec.dilation)
        return conv(hidden, up) * self.scale

    def to_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.lora_up.weight": self.lora_up.detach().clone().contiguous(),
            f"{prefix}.lora_down.weight": self.lora_down.detach().clone().contiguous(),
            f"{prefix}.alpha": self.alpha.detach().clone(),
        }
