"""LoHa (LyCORIS): dW = (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b), a Hadamard product of two
rank-r products, so dW can have rank up to r^2 for the parameters of two rank-r LoRAs.

Matrices are [out, r] @ [r, in*k*k] (convs flattened, as ComfyUI's loader multiplies them with
``torch.mm`` and reshapes to the weight). ``w2_a`` starts at zero (as LyCORIS does), so step 0 is
the base model while the other three factors are random and gradients reach ``w2_a``.

Bypass uses the identity (A1 B1) * (A2 B2) = (A1 . A2)(B1 . B2) with row-wise / column-wise
Khatri-Rao products, i.e. a rank-r^2 LoRA, when that is cheaper than building dW.
"""
from __future__ import annotations

import math

import torch

from .base import Adapter, LayerSpec, apply_base_op, check_rank_and_groups
from .lora import low_rank_apply

NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LoHaAdapter(Adapter):
    algorithm = "loha"

    def __init__(self, spec: LayerSpec, rank: int, alpha: float, *, dtype=torch.float32, device=None,
                 generator: torch.Generator | None = None):
        super().__init__(spec)
        check_rank_and_groups(spec, rank, "LoHa")
        out, cols = spec.out_features, spec.in_features * math.prod(spec.kernel_size)
        inits = {
            "hada_w1_a": torch.randn((out, rank), generator=generator) * 0.1,
            "hada_w1_b": torch.randn((rank, cols), generator=generator),
            "hada_w2_a": torch.zeros((out, rank)),
            "hada_w2_b": torch.randn((rank, cols), generator=generator),
        }
        for name, value in inits.items():
            setattr(self, name, torch.nn.Parameter(value.to(device=device, dtype=dtype)))
        self.set_alpha(float(alpha))

    @classmethod
    def from_state_dict(cls, spec: LayerSpec, tensors: dict[str, torch.Tensor], *, dtype=torch.float32,
                        device=None) -> "LoHaAdapter | None":
        if "hada_w1_a" not in tensors or "hada_t1" in tensors:  # CP/tucker LoHa is not supported
            return None
        rank = tensors["hada_w1_b"].shape[0]
        alpha = tensors.get("alpha")
        adapter = cls(spec, rank, float(rank if alpha is None else alpha), dtype=dtype, device=device)
        with torch.no_grad():
            for name in NAMES:
                param = getattr(adapter, name)
                param.copy_(tensors[name].reshape(param.shape).to(dtype))
        return adapter

    @property
    def rank(self) -> int:
        return self.hada_w1_b.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha_value / self.rank

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        diff = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
        return (self.scale * diff).reshape(self.spec.weight_shape)

    def use_factored(self) -> bool:
        """Whether the rank-r^2 path costs fewer multiply-adds per output than a full dW."""
        out, cols = self.hada_w1_a.shape[0], self.hada_w1_b.shape[1]
        return self.rank ** 2 * (out + cols) < out * cols

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_factored():
            return apply_base_op(self.spec, x, self.delta_weight().to(x.dtype))
        r2 = self.rank ** 2
        up = (self.hada_w1_a[:, :, None] * self.hada_w2_a[:, None, :]).reshape(-1, r2)
        down = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).reshape(r2, -1)
        return low_rank_apply(self.spec, x, up, down) * self.scale

    def to_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.{n}": getattr(self, n).detach().clone().contiguous() for n in NAMES}
        out[f"{prefix}.alpha"] = self.alpha.detach().clone()
        return out
