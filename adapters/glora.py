"""GLoRA (LyCORIS, generalised LoRA): dW = (alpha / rank) * (W a1 a2 + b1 b2): a low-rank map of
the input channels applied to the base weight itself, plus an ordinary LoRA.

Layout is what ComfyUI's GLoRA loader reads as the current (not "old") format: ``a1.weight``
[in, r(, 1, 1)], ``a2.weight`` [r, in(, 1, 1)] (for convs they mix input channels, per kernel
tap, and are stored as 1x1 convs, as LyCORIS stores and expects them), ``b1.weight``
[out, r(, 1, 1)], ``b2.weight`` [r, in(, k, k)]. That loader takes the *old* format whenever
rank == out == in, so that shape is refused. ``a2`` and ``b1`` start at
zero (step 0 is the base model) while ``a1`` and ``b2`` are random, so both get gradients.

Bypass never builds dW: W a1 is only [out, r(, k, k)], so W a1 a2 x = (W a1)(a2 x) is a rank-r
path (for convs: a 1x1 conv by a2, then a conv by W a1 with the layer's stride/padding).
"""
from __future__ import annotations

import math

import torch

from .base import Adapter, LayerSpec, check_rank_and_groups, conv_fn
from .lora import kaiming_uniform, low_rank_apply

NAMES = ("a1", "a2", "b1", "b2")


class GLoRAAdapter(Adapter):
    algorithm = "glora"

    def __init__(self, spec: LayerSpec, rank: int, alpha: float, *, dtype=torch.float32, device=None,
                 generator: torch.Generator | None = None):
        super().__init__(spec)
        check_rank_and_groups(spec, rank, "GLoRA")
        taps = math.prod(spec.kernel_size)
        if rank == spec.out_features == spec.in_features:
            raise ValueError(f"GLoRA rank {rank} equals both dims of this layer; ComfyUI would read the "
                             "file in the old GLoRA layout. Use a smaller rank.")
        ones = [1] * spec.conv_dims
        inits = {
            "a1": kaiming_uniform((spec.in_features, rank), spec.in_features, generator),
            "a2": torch.zeros((rank, spec.in_features)),
            "b1": torch.zeros((spec.out_features, rank, *ones)),
            "b2": kaiming_uniform((rank, spec.in_features, *spec.kernel_size), spec.in_features * taps, generator),
        }
        for name, value in inits.items():
            setattr(self, name, torch.nn.Parameter(value.to(device=device, dtype=dtype)))
        self.set_alpha(float(alpha))

    @classmethod
    def from_state_dict(cls, spec: LayerSpec, tensors: dict[str, torch.Tensor], *, dtype=torch.float32,
                        device=None) -> "GLoRAAdapter | None":
        if not all(f"{n}.weight" in tensors for n in NAMES):
            return None
        rank = tensors["a2.weight"].shape[0]
        alpha = tensors.get("alpha")
        adapter = cls(spec, rank, float(rank if alpha is None else alpha), dtype=dtype, device=device)
        with torch.no_grad():
            for name in NAMES:
                param = getattr(adapter, name)
                param.copy_(tensors[f"{name}.weight"].reshape(param.shape).to(dtype))
        return adapter

    @property
    def rank(self) -> int:
        return self.a2.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha_value / self.rank

    def _weight_a1(self, weight: torch.Tensor) -> torch.Tensor:
        """W a1: the base weight's input channels mapped through a1, [out, r(, k, k)]."""
        return torch.einsum("oi...,ir->or...", weight, self.a1.to(weight.dtype))

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        if base_weight is None:
            raise ValueError("GLoRA's weight change depends on the base weight; pass it")
        wa = torch.einsum("or...,ri->oi...", self._weight_a1(base_weight.float()), self.a2.float())
        bb = (self.b1.flatten(1) @ self.b2.flatten(1)).reshape(self.spec.weight_shape)
        return self.scale * (wa + bb)

    @property
    def reads_base_weight(self) -> bool:
        return True  # its path a multiplies the input by W a1

    def bypass(self, x: torch.Tensor, base_out: torch.Tensor, module: torch.nn.Module,
               strength: float = 1.0) -> torch.Tensor:
        spec = self.spec
        weight = module.weight.to(device=x.device, dtype=x.dtype)
        wa1 = self._weight_a1(weight)
        a2 = self.a2.to(x.dtype)
        if spec.kind == "linear":
            path_a = torch.nn.functional.linear(torch.nn.functional.linear(x, a2), wa1)
        else:
            conv = conv_fn(spec.conv_dims)
            mixed = conv(x, a2.reshape(*a2.shape, *([1] * spec.conv_dims)))
            path_a = conv(mixed, wa1, None, spec.stride, spec.padding, spec.dilation)
        path_b = low_rank_apply(spec, x, self.b1.flatten(1), self.b2.flatten(1))
        return base_out + (strength * self.scale) * (path_a + path_b)

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("GLoRA's change depends on the base weight; use bypass()")

    def to_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        pointwise = (1,) * self.spec.conv_dims  # a1 and a2 of a conv as 1x1 convs
        out = {f"{prefix}.{n}.weight": getattr(self, n).detach().clone().contiguous() for n in NAMES}
        for name in ("a1", "a2"):
            out[f"{prefix}.{name}.weight"] = out[f"{prefix}.{name}.weight"].reshape(
                *getattr(self, name).shape, *pointwise)
        out[f"{prefix}.alpha"] = self.alpha.detach().clone()
        return out
