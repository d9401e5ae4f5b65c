"""OFT (block-diagonal orthogonal finetuning): the output channels of W are rotated blockwise,
W' = R W with R = diag(R_1 .. R_n), each R_k the Cayley transform (I + Q)(I - Q)^-1 of a skew matrix
Q = B - B^T. ``oft_blocks`` B [n, b, b] starts at zero, so R = I (step 0 is the base model) and the
gradient reaches B through the Cayley transform.

Matches ComfyUI's OFT loader (a 3-D ``oft_blocks``):
- the block acts as R^T on the rows of W (its einsum contracts R's first index);
- ``alpha`` is the COFT constraint, not a scale: when ||Q||_F (over all blocks) + 1e-8 exceeds it,
  Q is rescaled to that norm; 0 turns it off. Our ``constraint`` option is saved as ``alpha``;
- strength enters twice: W' = W + s^2 (R^T - I) W. We reproduce that exactly;
- a ``rescale`` tensor is ignored by that loader, so OFT here has none (BOFT does).
Block size: ``block_size`` if it divides the output channels, else LyCORIS' rule with ``rank`` (or
``block_size``) as the factor: ``factorization(out, rank)[0]``, i.e. rank is the (largest) block size.

Bypass: R acts on output channels only, so y = b + R (y_base - b) blockwise; no full weight.
"""
from __future__ import annotations

import torch

from .base import Adapter, LayerSpec
from .lokr import factorization


def cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """Orthogonal R = (I + Q)(I - Q)^-1 per block (last two dims), Q = B - B^T, with COFT's global
    norm constraint; float32 (the solve needs it)."""
    blocks = blocks.float()
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        q_norm = torch.linalg.vector_norm(q) + 1e-8  # no host sync: where() instead of if
        q = q * torch.where(q_norm > constraint, constraint / q_norm, torch.ones_like(q_norm))
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    return torch.linalg.solve(eye - q, eye + q)  # (I - Q)^-1 (I + Q) == (I + Q)(I - Q)^-1


def channels_first(t: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """View of a layer output with the output-channel axis first (Linear: last; Conv: dim 1)."""
    return t.movedim(-1 if spec.kind == "linear" else 1, 0)


def channels_back(t: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    return t.movedim(0, -1 if spec.kind == "linear" else 1)


def without_bias(base_out: torch.Tensor, module: torch.nn.Module, spec: LayerSpec) -> torch.Tensor:
    """W x, from the layer's output W x + b."""
    bias = getattr(module, "bias", None)
    if bias is None:
        return base_out
    bias = bias.to(device=base_out.device, dtype=base_out.dtype)
    return base_out - (bias if spec.kind == "linear" else bias.reshape(-1, *([1] * spec.conv_dims)))


class OFTAdapter(Adapter):
    algorithm = "oft"

    def __init__(self, spec: LayerSpec, rank: int, alpha: float = 0.0, *, dtype=torch.float32, device=None,
                 generator: torch.Generator | None = None, block_size: int = 0, constraint: float = 0.0):
        super().__init__(spec)
        out = spec.out_features
        if block_size > 0 and out % block_size == 0:
            size = block_size
        else:
            size = factorization(out, block_size if block_size > 0 else rank)[0]
        if size < 2:
            raise ValueError(f"OFT found no block size > 1 for {out} output channels (rank {rank}, "
                             f"block_size {block_size}); 1x1 blocks cannot rotate anything: set rank (OFT's "
                             "block size) to 2 or more")
        self.oft_blocks = torch.nn.Parameter(torch.zeros(out // size, size, size, device=device, dtype=dtype))
        # ``alpha`` (the create() argument) is unused: in OFT files alpha *is* the constraint
        self.set_alpha(float(constraint))

    @classmethod
    def from_state_dict(cls, spec: LayerSpec, tensors: dict[str, torch.Tensor], *, dtype=torch.float32,
                        device=None) -> "OFTAdapter | None":
        blocks = tensors.get("oft_blocks")
        if blocks is None or blocks.ndim != 3:
            return None
        alpha = tensors.get("alpha")
        adapter = cls(spec, blocks.shape[1], dtype=dtype, device=device, block_size=blocks.shape[1],
                      constraint=0.0 if alpha is None else float(alpha))
        with torch.no_grad():
            adapter.oft_blocks.copy_(blocks.reshape(adapter.oft_blocks.shape).to(dtype))
        return adapter

    @property
    def rank(self) -> int:
        return self.oft_blocks.shape[1]

    def _rows_delta(self, t: torch.Tensor) -> torch.Tensor:
        """(R^T - I) applied blockwise to dim 0 of ``t`` (weight rows, or output channels)."""
        n, size, _ = self.oft_blocks.shape
        eye = torch.eye(size, device=t.device, dtype=torch.float32)
        mix = (cayley(self.oft_blocks, self.alpha_value).to(t.device) - eye).to(t.dtype)
        return torch.einsum("knm,kn...->km...", mix, t.unflatten(0, (n, size))).flatten(0, 1)

    def merged_weight(self, base_weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        w = base_weight.float()
        return (w + (strength * strength) * self._rows_delta(w)).to(base_weight.dtype)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        if base_weight is None:
            raise ValueError("OFT's weight change depends on the base weight; pass it")
        return self._rows_delta(base_weight.float())

    @property
    def transforms_base_output(self) -> bool:
        return True

    def bypass(self, x: torch.Tensor, base_out: torch.Tensor, module: torch.nn.Module,
               strength: float = 1.0) -> torch.Tensor:
        z = channels_first(without_bias(base_out, module, self.spec), self.spec)
        return base_out + (strength * strength) * channels_back(self._rows_delta(z), self.spec)

    def to_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.oft_blocks": self.oft_blocks.detach().clone().contiguous(),
                f"{prefix}.alpha": self.alpha.detach().clone()}
