"""LoKr (LyCORIS): dW = scale * kron(w1, w2), with w1 [out_l, in_m] small and w2 [out_k, in_n*k*k].

Shapes follow LyCORIS: out = out_l * out_k and in = in_m * in_n from ``factorization(dim, factor)``
(``factor=-1``: the most balanced split, else the split whose smaller side is closest to ``factor``);
the conv kernel lives in w2. Options:
- ``decompose_both``: w1 as w1_a @ w1_b too (only if rank < max(out_l, in_m) / 2, as LyCORIS);
- ``full_matrix``: w2 as one full matrix; also used whenever rank >= max(out_k, in_n) / 2, where a
  low-rank w2 would not save anything (LyCORIS' rule).
``scale`` is ComfyUI's: alpha / rank if any factor is low-rank, else 1 (alpha is then ignored, and
saved as the rank, as LyCORIS does, so the file still tells the rank).
The w2 side starts at zero (lokr_w2, or lokr_w2_b), so step 0 is the base model.

Bypass never builds dW: (w1 (x) w2) x = vec(w1 X w2^T) with x reshaped to [in_m, in_n]; for a conv,
the in_m channel groups are folded into the batch and w2 runs as a conv over in_n channels.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .base import Adapter, LayerSpec, apply_base_op, check_rank_and_groups
from .lora import kaiming_uniform, low_rank_apply


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n == dim and m <= n: the LyCORIS split. ``factor`` > 0 is used as m when it
    divides dim and m <= n; otherwise m is the largest divisor <= sqrt(dim) (and <= factor)."""
    if factor > 0 and dim % factor == 0 and dim >= factor * factor:
        return factor, dim // factor
    limit = dim if factor < 0 else factor
    best, d = 1, 2
    while d * d <= dim:
        if dim % d == 0 and d <= limit:
            best = d
        d += 1
    return best, dim // best


class LoKrAdapter(Adapter):
    algorithm = "lokr"

    def __init__(self, spec: LayerSpec, rank: int, alpha: float, *, dtype=torch.float32, device=None,
                 generator: torch.Generator | None = None, factor: int = -1, decompose_both: bool = False,
                 full_matrix: bool = False, shapes: tuple | None = None):
        super().__init__(spec)
        check_rank_and_groups(spec, rank, "LoKr")
        if shapes is None:  # (out_l, out_k, in_m, in_n, w1 rank or None, w2 rank or None)
            out_l, out_k = factorization(spec.out_features, factor)
            in_m, in_n = factorization(spec.in_features, factor)
            r1 = rank if decompose_both and rank < max(out_l, in_m) / 2 else None
            r2 = None if full_matrix or rank >= max(out_k, in_n) / 2 else rank
            shapes = (out_l, out_k, in_m, in_n, r1, r2)
        out_l, out_k, in_m, in_n, r1, r2 = shapes
        if out_l * out_k != spec.out_features or in_m * in_n != spec.in_features:
            raise ValueError(f"LoKr factors {shapes} do not fit a layer of shape {spec.weight_shape}")
        self.shapes = shapes
        self._rank = r2 or r1 or rank
        taps = math.prod(spec.kernel_size)
        params = {}
        if r1 is None:
            params["lokr_w1"] = kaiming_uniform((out_l, in_m), in_m, generator)
        else:
            params["lokr_w1_a"] = kaiming_uniform((out_l, r1), r1, generator)
            params["lokr_w1_b"] = kaiming_uniform((r1, in_m), in_m, generator)
        if r2 is None:
            params["lokr_w2"] = torch.zeros((out_k, in_n * taps))
        else:
            params["lokr_w2_a"] = kaiming_uniform((out_k, r2), r2, generator)
            params["lokr_w2_b"] = torch.zeros((r2, in_n * taps))
        self.names = tuple(params)
        for name, value in params.items():
            setattr(self, name, torch.nn.Parameter(value.to(device=device, dtype=dtype)))
        alpha = float(alpha) if (r1 or r2) else float(rank)
        self.set_alpha(alpha)

    @classmethod
    def from_state_dict(cls, spec: LayerSpec, tensors: dict[str, torch.Tensor], *, dtype=torch.float32,
                        device=None) -> "LoKrAdapter | None":
        has_w1 = "lokr_w1" in tensors or "lokr_w1_a" in tensors
        has_w2 = "lokr_w2" in tensors or "lokr_w2_a" in tensors
        if not (has_w1 and has_w2) or "lokr_t2" in tensors:  # tucker LoKr is not supported
            return None
        r1 = tensors["lokr_w1_b"].shape[0] if "lokr_w1_b" in tensors else None
        r2 = tensors["lokr_w2_b"].shape[0] if "lokr_w2_b" in tensors else None
        out_l = (tensors["lokr_w1"] if r1 is None else tensors["lokr_w1_a"]).shape[0]
        in_m = (tensors["lokr_w1"] if r1 is None else tensors["lokr_w1_b"]).shape[1]
        shapes = (out_l, spec.out_features // out_l, in_m, spec.in_features // in_m, r1, r2)
        alpha = tensors.get("alpha")
        low = r2 or r1
        rank = low or (max(1, round(float(alpha))) if alpha is not None else 1)
        alpha = float(low or rank) if alpha is None else float(alpha)  # no alpha: scale 1, as ComfyUI
        adapter = cls(spec, rank, alpha, dtype=dtype, device=device, shapes=shapes)
        with torch.no_grad():
            for name in adapter.names:
                param = getattr(adapter, name)
                param.copy_(tensors[name].reshape(param.shape).to(dtype))
        return adapter

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def scale(self) -> float:
        r1, r2 = self.shapes[4:]
        low = r2 or r1
        return self.alpha_value / low if low else 1.0

    def w1(self) -> torch.Tensor:
        return self.lokr_w1 if self.shapes[4] is None else self.lokr_w1_a @ self.lokr_w1_b

    def w2(self) -> torch.Tensor:
        return self.lokr_w2 if self.shapes[5] is None else self.lokr_w2_a @ self.lokr_w2_b

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return (self.scale * torch.kron(self.w1(), self.w2())).reshape(self.spec.weight_shape)

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        out_l, out_k, in_m, in_n, _, r2 = self.shapes
        sub = dataclasses.replace(self.spec, in_features=in_n, out_features=out_k)
        if self.spec.kind == "linear":
            folded = x.reshape(-1, in_m, in_n)
        else:
            folded = x.reshape(x.shape[0] * in_m, in_n, *x.shape[2:])
        if r2 is None:
            part = apply_base_op(sub, folded, self.lokr_w2.reshape(out_k, in_n, *sub.kernel_size).to(x.dtype))
        else:
            part = low_rank_apply(sub, folded, self.lokr_w2_a, self.lokr_w2_b)
        w1 = self.w1().to(x.dtype)
        if self.spec.kind == "linear":  # part [B, in_m, out_k]
            y = torch.einsum("lm,bmk->blk", w1, part)
            return y.reshape(*x.shape[:-1], out_l * out_k) * self.scale
        part = part.reshape(x.shape[0], in_m, out_k, *part.shape[2:])
        y = torch.einsum("lm,bmk...->blk...", w1, part)
        return y.reshape(x.shape[0], out_l * out_k, *y.shape[3:]) * self.scale

    def to_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.names:
            t = getattr(self, name).detach().clone()
            if name == "lokr_w2" and self.spec.conv_dims == 2:  # LyCORIS' 4-D conv layout
                t = t.reshape(t.shape[0], self.shapes[3], *self.spec.kernel_size)
            out[f"{prefix}.{name}"] = t.contiguous()
        out[f"{prefix}.alpha"] = self.alpha.detach().clone()
        return out
