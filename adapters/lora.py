"""LoRA: W' = W + (alpha / rank) * up @ down, optionally with DoRA's magnitude vector.

``down`` maps the layer input to ``rank`` features (for a conv it is a conv with the base
kernel, stride and padding); ``up`` maps back (a 1x1 conv for convs). ``down`` starts at zero, so a
fresh adapter changes nothing: step 0 reproduces the base model exactly. ``up`` starts random with
fan-in = rank, as in ComfyUI's native trainer: with Adam the size of the random factor sets how far
one step moves the weight, so a learning rate tuned for the native node trains the same here
(kohya's orientation, a random ``down`` with fan-in = layer width, moves it sqrt(width / rank)
times less per step at the same rate).

DoRA (``dora=True``) adds ``dora_scale`` of shape ``[1, in, 1...]``: one magnitude per *input*
channel. That is the axis on which ComfyUI's ``weight_decompose`` normalises the adapted weight
``W + dW`` (its other, output axis divides by the norm of the *base* weight, which is not DoRA), so
the file means the same in ComfyUI, A1111/Forge and LyCORIS. ComfyUI applies strength as a blend:
``W' = W + s * (m * (W + dW) / (||W + dW||_col + eps) - W)``, eps = float32 eps. The magnitude is
initialised from the base weight the first time the adapter sees it (``create`` has no weight),
or eagerly with ``init_magnitude(W)``.
"""
from __future__ import annotations

import math

import torch

from . import conv_taps
from .base import Adapter, LayerSpec, apply_base_op, check_rank_and_groups, conv_fn
from .cpu_kernels import low_rank_add_fp32, use_onednn

EPS = torch.finfo(torch.float32).eps  # ComfyUI patches float32 weights, so its eps is this one


def kaiming_uniform(shape, fan_in: int, generator: torch.Generator | None) -> torch.Tensor:
    """torch's default layer init (kaiming-uniform, a=sqrt(5)), float32 on the CPU."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def _pointwise(spec: LayerSpec) -> bool:
    """A conv that maps each position on its own: a 1x1 kernel, stride 1, no padding."""
    return (spec.kind == "conv" and all(k == 1 for k in spec.kernel_size) and all(s == 1 for s in spec.stride)
            and not isinstance(spec.padding, str) and not any(spec.padding))


def down_project(spec: LayerSpec, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``down`` [r, in*k*k] applied as the layer's op (a conv with its kernel/stride/padding).

    A pointwise conv runs as a matmul over the flattened positions: oneDNN's convolution with only
    ``r`` output channels runs its forward and backward 2-4x slower than that matmul."""
    rank = down.shape[0]
    if spec.kind == "linear":
        return torch.nn.functional.linear(x, down.reshape(rank, spec.in_features).to(x.dtype))
    if _pointwise(spec):
        flat = x.reshape(x.shape[0], spec.in_features, -1)
        h = torch.matmul(down.reshape(rank, spec.in_features).to(x.dtype), flat)
        return h.view(x.shape[0], rank, *x.shape[2:])
    down = down.reshape(rank, spec.in_features, *spec.kernel_size).to(x.dtype)
    return conv_fn(spec.conv_dims)(x, down, None, spec.stride, spec.padding, spec.dilation)


def low_rank_apply(spec: LayerSpec, x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``(up @ down) x`` through the rank bottleneck: ``down`` [r, in*k*k] runs as the layer's op
    (conv with its kernel/stride/padding), ``up`` [out, r] as a 1x1 map; no full-size weight."""
    h = down_project(spec, x, down)
    up = up.reshape(up.shape[0], up.shape[1]).to(x.dtype)
    if spec.kind == "linear":
        return torch.nn.functional.linear(h, up)
    out = torch.matmul(up, h.reshape(h.shape[0], h.shape[1], -1))
    return out.view(h.shape[0], up.shape[0], *h.shape[2:])


def low_rank_add(spec: LayerSpec, base_out: torch.Tensor, x: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 coefficient: float) -> torch.Tensor:
    """``base_out + coefficient * (up @ down) x`` with the scale folded into the small ``up`` and the
    addition fused into the up-projection (addmm / baddbmm): one full-size write instead of the
    four of ``base_out + (up(down(x)) * scale) * strength``, forward and backward."""
    if use_onednn(base_out, x, up, down):
        if spec.kind == "linear" or _pointwise(spec):
            return low_rank_add_fp32(base_out, x, up, down, coefficient, conv=spec.kind != "linear")
        if conv_taps.fits(spec):
            return low_rank_add_fp32(base_out, x, up, down, coefficient, conv=True, taps=conv_taps.ConvTaps.of(spec, x))
    rank = down.shape[0]
    up = (up.reshape(up.shape[0], rank) * coefficient).to(x.dtype)
    h = down_project(spec, x, down)
    if spec.kind == "linear":
        # up.T as a row-major [r, out] matrix: its gradient is then h.T @ grad (an [r, M] x [M, out]
        # product); given the transposed view, autograd computes grad.T @ h instead, a tall-skinny
        # product with r outputs per row that CPU BLAS runs 5-20x slower.
        out = torch.addmm(base_out.reshape(-1, up.shape[0]), h.reshape(-1, rank), up.t().contiguous())
        return out.view(base_out.shape)
    batch = h.shape[0]
    out = torch.baddbmm(base_out.reshape(batch, up.shape[0], -1), up.expand(batch, *up.shape), h.reshape(batch, rank, -1))
    return out.view(base_out.shape)


class LoRAAdapter(Adapter):
    algorithm = "lora"

    def __init__(self, spec: LayerSpec, rank: int, alpha: float, *, dtype=torch.float32,
                 device=None, generator: torch.Generator | None = None, dora: bool = False):
        super().__init__(spec)
        check_rank_and_groups(spec, rank, "LoRA")
        in_dim = spec.in_features
        down_shape = (rank, in_dim, *spec.kernel_size)
        self.lora_down = torch.nn.Parameter(torch.zeros(down_shape, device=device, dtype=dtype))
        up = kaiming_uniform((spec.out_features, rank, *([1] * spec.conv_dims)), rank, generator)
        self.lora_up = torch.nn.Parameter(up.to(device=device, dtype=dtype))
        self.set_alpha(float(alpha))
        if dora:
            if spec.out_features == 1:  # ComfyUI would read a [1, in] magnitude as output-axis
                raise ValueError("DoRA needs a layer with more than one output feature")
            self.algorithm = "dora"
            shape = (1, in_dim, *([1] * spec.conv_dims))
            # NaN marks "not initialised yet"; the first forward fills it from the base weight
            self.dora_scale = torch.nn.Parameter(torch.full(shape, math.nan, device=device, dtype=dtype))
        else:
            self.register_parameter("dora_scale", None)
        self._magnitude_ready = False

    @classmethod
    def from_tensors(cls, spec: LayerSpec, up: torch.Tensor, down: torch.Tensor, alpha: float | None,
                     *, dtype=torch.float32, device=None, dora_scale: torch.Tensor | None = None) -> "LoRAAdapter":
        """Rebuilds an adapter from saved up/down matrices (any layout that reshapes to ours)."""
        rank = down.shape[0]
        adapter = cls(spec, rank, float(rank if alpha is None else alpha), dtype=dtype, device=device,
                      dora=dora_scale is not None)
        with torch.no_grad():
            adapter.lora_down.copy_(down.reshape(adapter.lora_down.shape).to(dtype))
            adapter.lora_up.copy_(up.reshape(adapter.lora_up.shape).to(dtype))
            if dora_scale is not None:
                if dora_scale.ndim < 2 or dora_scale.shape[0] != 1 or dora_scale.shape[1] != spec.in_features:
                    raise ValueError(f"DoRA magnitude of shape {tuple(dora_scale.shape)} is on the output "
                                     "axis; only input-axis DoRA ([1, in, ...]) is supported")
                adapter.dora_scale.copy_(dora_scale.reshape(adapter.dora_scale.shape).to(dtype))
                adapter._magnitude_ready = True
        return adapter

    @classmethod
    def from_state_dict(cls, spec: LayerSpec, tensors: dict[str, torch.Tensor], *, dtype=torch.float32,
                        device=None) -> "LoRAAdapter | None":
        if "lora_up.weight" not in tensors or "lora_down.weight" not in tensors:
            return None
        if "lora_mid.weight" in tensors:
            raise ValueError("a LoCon layer with a Tucker core (lora_mid) cannot be continued here: LoRA Lab "
                             "trains conv LoRA as up/down only")
        alpha = tensors.get("alpha")
        return cls.from_tensors(spec, tensors["lora_up.weight"], tensors["lora_down.weight"],
                                None if alpha is None else float(alpha), dtype=dtype, device=device,
                                dora_scale=tensors.get("dora_scale"))

    @property
    def rank(self) -> int:
        return self.lora_down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha_value / self.rank

    @property
    def is_dora(self) -> bool:
        return self.dora_scale is not None

    @property
    def reads_base_weight(self) -> bool:
        return self.is_dora  # the column norms of W + dW

    def _lora_delta(self) -> torch.Tensor:
        up = self.lora_up.flatten(1)
        down = self.lora_down.flatten(1)
        return (self.scale * (up @ down)).reshape(self.spec.weight_shape)

    # --- DoRA ------------------------------------------------------------------------------
    def _norm_dims(self) -> tuple[int, ...]:
        return (0, *range(2, 2 + self.spec.conv_dims))  # all but the input-channel axis

    def init_magnitude(self, base_weight: torch.Tensor) -> None:
        """m = ||W||_col + eps, computed exactly as the forward computes it, so step 0 is a no-op."""
        # .float() first: fp8-stored weights cannot be promoted inside the norm
        norm = torch.linalg.vector_norm(base_weight.float(), dim=self._norm_dims(), keepdim=True)
        with torch.no_grad():
            self.dora_scale.copy_((norm + EPS).to(self.dora_scale))
        self._magnitude_ready = True

    def _ensure_magnitude(self, base_weight: torch.Tensor) -> None:
        if not self._magnitude_ready:
            if torch.isnan(self.dora_scale).any():
                self.init_magnitude(base_weight)
            self._magnitude_ready = True

    def merged_weight(self, base_weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        if not self.is_dora:
            return super().merged_weight(base_weight, strength)
        self._ensure_magnitude(base_weight)
        w = base_weight.float()
        calc = w + self._lora_delta().float()
        norm = torch.linalg.vector_norm(calc, dim=self._norm_dims(), keepdim=True)
        calc = calc * (self.dora_scale.float() / (norm + EPS))
        out = calc if strength == 1.0 else w + strength * (calc - w)
        return out.to(base_weight.dtype)

    def _dora_column_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """m / (||W + dW||_col + eps) per input channel, from small matmuls only:
        ||W_j + dW_j||^2 = ||W_j||^2 + 2 k <W_j, (BA)_j> + k^2 ||(BA)_j||^2 (summed over kernel taps)."""
        in_dim, taps = self.spec.in_features, math.prod(self.spec.kernel_size)
        k = self.scale
        up = self.lora_up.flatten(1).float()      # B [out, r]
        down = self.lora_down.flatten(1).float()  # A [r, in*taps]
        base = torch.linalg.vector_norm(weight, dim=self._norm_dims(), dtype=torch.float32)
        cross = ((up.t().to(weight.dtype) @ weight.reshape(weight.shape[0], -1)).float() * down).sum(0)
        own = (((up.t() @ up) @ down) * down).sum(0)
        extra = (2 * k * cross + (k * k) * own).reshape(in_dim, taps).sum(1)
        norm = torch.sqrt(torch.clamp_min(base * base + extra, 0.0))
        return self.dora_scale.reshape(in_dim).float() / (norm + EPS)

    def bypass(self, x: torch.Tensor, base_out: torch.Tensor, module: torch.nn.Module,
               strength: float = 1.0) -> torch.Tensor:
        if not self.is_dora:
            return low_rank_add(self.spec, base_out, x, self.lora_up, self.lora_down, self.scale * strength)
        weight = module.weight.to(device=x.device, dtype=x.dtype)
        self._ensure_magnitude(weight)
        c = self._dora_column_scale(weight).to(x.dtype)
        c = c if self.spec.kind == "linear" else c.reshape(-1, *([1] * self.spec.conv_dims))
        # (W + dW)(c*x) - W x = W((c-1)*x) + dW(c*x): one extra base op, no full-size weight
        xc = x * c
        diff = apply_base_op(self.spec, x * (c - 1), weight) + self.forward_delta(xc, dora_ok=True)
        return base_out + diff * strength

    # ---------------------------------------------------------------------------------------
    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        if not self.is_dora:
            return self._lora_delta()
        if base_weight is None:
            raise ValueError("DoRA's weight change depends on the base weight; pass it")
        return self.merged_weight(base_weight, 1.0).float() - base_weight.float()

    def forward_delta(self, x: torch.Tensor, dora_ok: bool = False) -> torch.Tensor:
        if self.is_dora and not dora_ok:
            raise RuntimeError("DoRA is not additive in the input; use bypass()")
        return low_rank_apply(self.spec, x, self.lora_up.flatten(1), self.lora_down.flatten(1)) * self.scale

    def to_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {
            f"{prefix}.lora_up.weight": self.lora_up.detach().clone().contiguous(),
            f"{prefix}.lora_down.weight": self.lora_down.detach().clone().contiguous(),
            f"{prefix}.alpha": self.alpha.detach().clone(),
        }
        if self.is_dora:
            if torch.isnan(self.dora_scale).any():
                raise RuntimeError("DoRA magnitude is not initialised: run a forward or call init_magnitude(W)")
            out[f"{prefix}.dora_scale"] = self.dora_scale.detach().clone().contiguous()
        return out
