"""Trainable offsets of norm weights and biases, saved as ``.diff`` / ``.diff_b``.

ComfyUI's native trainer always trains these; here they are opt-in (most LoRA recipes leave them
frozen, and they make files incompatible with strict kohya loaders). They are tiny 1-D tensors,
so they are applied through ComfyUI's weight wrappers, except that in bypass mode the bias offsets
of Linear and Conv layers are added to the layer output (see ``output_biases``).
"""
from __future__ import annotations

import torch

OFFSET_SUFFIXES = ("diff", "diff_b")
WEIGHTED_LAYERS = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)


def _param_name(suffix: str) -> str:
    return "weight" if suffix == "diff" else "bias"


class OffsetSet(torch.nn.Module):
    """Offsets keyed by (layer path, 'diff' | 'diff_b')."""

    def __init__(self, offsets: dict[tuple[str, str], torch.Tensor]):
        super().__init__()
        self.keys_ = list(offsets)
        self.values_ = torch.nn.ParameterList(torch.nn.Parameter(v) for v in offsets.values())

    def __len__(self):
        return len(self.keys_)

    def items(self):
        return zip(self.keys_, self.values_)

    @classmethod
    def create(cls, diffusion_model: torch.nn.Module, *, dtype=torch.float32, device=None) -> "OffsetSet":
        """Zero offsets for every norm weight (1-D weights) and every bias of ComfyUI's layers."""
        offsets = {}
        for name, module in diffusion_model.named_modules():
            if not hasattr(module, "weight_function"):
                continue
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if weight is not None and weight.ndim < 2:
                offsets[(name, "diff")] = torch.zeros(weight.shape, dtype=dtype, device=device)
            if bias is not None:
                offsets[(name, "diff_b")] = torch.zeros(bias.shape, dtype=dtype, device=device)
        return cls(offsets)

    @classmethod
    def from_tensors(cls, modules: dict[str, torch.nn.Module], tensors: dict[tuple[str, str], torch.Tensor], *,
                     dtype=torch.float32, device=None) -> tuple["OffsetSet", list[tuple[str, str]]]:
        """Offsets from a file; also returns (layer, suffix) pairs whose shape fits no parameter."""
        offsets, rejected = {}, []
        order = {name: i for i, name in enumerate(modules)}
        for (layer, suffix), tensor in sorted(tensors.items(), key=lambda kv: (order.get(kv[0][0], -1), kv[0][1])):
            target = getattr(modules.get(layer), _param_name(suffix), None)
            if target is None or tuple(target.shape) != tuple(tensor.shape):
                rejected.append((layer, suffix))
                continue
            offsets[(layer, suffix)] = tensor.to(device=device, dtype=dtype).clone()
        return cls(offsets), rejected

    def output_biases(self, diffusion_model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The bias offsets of Linear and Conv layers, by layer: bypass mode adds these to the layer
        output. Fed through the op's bias instead, they would make the convolution backward build a
        full-size weight gradient too (its bias gradient comes with the weight gradient)."""
        return {layer: value for (layer, suffix), value in self.items()
                if suffix == "diff_b" and isinstance(diffusion_model.get_submodule(layer), WEIGHTED_LAYERS)}

    def attach(self, model_patcher, prefix: str, strength: float = 1.0, skip: frozenset = frozenset()) -> None:
        """Adds each offset to its parameter through ComfyUI weight wrappers; ``skip`` holds the
        layers whose bias offset is applied on the output instead (see output_biases)."""
        for (layer, suffix), value in self.items():
            if suffix == "diff_b" and layer in skip:
                continue

            def wrapper(weight, value=value):
                return weight + (value * strength).to(weight.dtype)
            model_patcher.add_weight_wrapper(f"{prefix}{layer}.{_param_name(suffix)}", wrapper)

    def to_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}{layer}.{suffix}": value.detach().clone().cpu() for (layer, suffix), value in self.items()}
