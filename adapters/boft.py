"""BOFT (butterfly OFT): the output channels are rotated by a product of ``boft_m`` sparse
orthogonal stages, each a block-diagonal Cayley rotation (blocks of b channels) conjugated by a
butterfly permutation, so a few small blocks mix all channels. ``oft_blocks`` [m, n, b, b] start
at zero (every stage is I: step 0 is the base model).

Matches ComfyUI's BOFT loader (a 4-D ``oft_blocks``):
- stage i pairs channels k = 2^i * b/2 apart: view the channel axis as [-1, 2, k], swap the last
  two, cut into blocks of b, apply R_i (as R, not R^T), undo the permutation;
- ``alpha`` is the COFT constraint (global norm of all Q), saved from our ``constraint`` option;
- strength enters twice: each stage becomes I + s (R_i - I), then W' = W + s (rescale * M_s W - W);
- optional per-output-channel ``rescale`` (option ``rescale``, starts at 1).
Sizes: b is the largest even divisor of the output channels <= ``block_size`` (default: rank);
stage i needs 2^i to divide out / b, so ``boft_m`` defaults to (and is capped at) the most stages
that fit: 1 + the number of trailing zero bits of out / b (LyCORIS' full butterfly when out / b is
a power of two).

Bypass: like OFT, the stages act on the output channels of y_base - b; no full weight is built.
"""
from __future__ import annotations

import torch

from .base import Adapter, LayerSpec
from .oft import cayley, channels_back, channels_first, without_bias


def butterfly_order(channels: int, block: int, stage: int, device=None) -> torch.Tensor:
    """The channel order in which stage ``stage`` sees the channels (consecutive runs of
    ``block`` are its blocks): channels 2^stage * block/2 apart end up next to each other."""
    half = (2 ** stage) * (block // 2)
    return torch.arange(channels, device=device).reshape(-1, 2, half).transpose(1, 2).reshape(-1)


class BOFTAdapter(Adapter):
    algorithm = "boft"

    def __init__(self, spec: LayerSpec, rank: int, alpha: float = 0.0, *, dtype=torch.float32, device=None,
                 generator: torch.Generator | None = None, block_size: int = 0, boft_m: int = 0,
                 constraint: float = 0.0, rescale: bool = False):
        super().__init__(spec)
        out = spec.out_features
        want = block_size if block_size > 0 else rank
        evens = [d for d in range(2, min(want, out) + 1, 2) if out % d == 0]
        if not evens:
            raise ValueError(f"BOFT needs an even block size <= {want} dividing {out} output channels: set rank "
                             "(BOFT's block size) to an even number, 2 or more")
        size = evens[-1]
        blocks = out // size
        most = 1 + ((blocks & -blocks).bit_length() - 1)  # 1 + trailing zero bits
        stages = most if boft_m <= 0 else min(boft_m, most)
        self.oft_blocks = torch.nn.Parameter(torch.zeros(stages, blocks, size, size, device=device, dtype=dtype))
        if rescale:
            shape = (out, *([1] * (len(spec.weight_shape) - 1)))
            self.rescale = torch.nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        else:
            self.register_parameter("rescale", None)
        # ``alpha`` (the create() argument) is unused: in BOFT files alpha *is* the constraint
        self.set_alpha(float(constraint))

    @classmethod
    def from_state_dict(cls, spec: LayerSpec, tensors: dict[str, torch.Tensor], *, dtype=torch.float32,
                        device=None) -> "BOFTAdapter | None":
        blocks = tensors.get("oft_blocks")
        if blocks is None or blocks.ndim != 4:
            return None
        alpha = tensors.get("alpha")
        stages, _, size, _ = blocks.shape
        adapter = cls(spec, size, dtype=dtype, device=device, block_size=size, boft_m=stages,
                      constraint=0.0 if alpha is None else float(alpha), rescale="rescale" in tensors)
        with torch.no_grad():
            adapter.oft_blocks.copy_(blocks.reshape(adapter.oft_blocks.shape).to(dtype))
            if adapter.rescale is not None:
                adapter.rescale.copy_(tensors["rescale"].reshape(adapter.rescale.shape).to(dtype))
        return adapter

    @property
    def rank(self) -> int:
        return self.oft_blocks.shape[2]

    def _rotate_rows(self, t: torch.Tensor, strength: float) -> torch.Tensor:
        """rescale * M_s t - t for dim 0 of ``t`` (weight rows, or output channels)."""
        stages, blocks, size, _ = self.oft_blocks.shape
        eye = torch.eye(size, device=t.device, dtype=torch.float32)
        rots = cayley(self.oft_blocks, self.alpha_value).to(t.device)
        mixes = (eye + strength * (rots - eye)).to(t.dtype)  # == s R + (1 - s) I, exact I at init
        out = t
        for i in range(stages):
            order = butterfly_order(t.shape[0], size, i, t.device)
            grouped = out[order].unflatten(0, (blocks, size))
            mixed = torch.einsum("bij,bj...->bi...", mixes[i], grouped).flatten(0, 1)
            out = torch.empty_like(mixed).index_copy_(0, order, mixed)
        if self.rescale is not None:
            out = out * self.rescale.reshape(-1, *([1] * (t.ndim - 1))).to(t)
        return out - t

    def merged_weight(self, base_weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        w = base_weight.float()
        return (w + strength * self._rotate_rows(w, strength)).to(base_weight.dtype)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        if base_weight is None:
            raise ValueError("BOFT's weight change depends on the base weight; pass it")
        return self._rotate_rows(base_weight.float(), 1.0)

    @property
    def transforms_base_output(self) -> bool:
        return True

    def bypass(self, x: torch.Tensor, base_out: torch.Tensor, module: torch.nn.Module,
               strength: float = 1.0) -> torch.Tensor:
        z = channels_first(without_bias(base_out, module, self.spec), self.spec)
        return base_out + strength * channels_back(self._rotate_rows(z, strength), self.spec)

    def to_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.oft_blocks": self.oft_blocks.detach().clone().contiguous(),
               f"{prefix}.alpha": self.alpha.detach().clone()}
        if self.rescale is not None:
            out[f"{prefix}.rescale"] = self.rescale.detach().clone().contiguous()
        return out
