"""A set of adapters, one per target layer, with the file layout ComfyUI's LoRA loader reads.

Layer names are module paths inside the diffusion model; in a state dict they appear under
``diffusion_model.<name>`` (ComfyUI key style), which ``comfy.sd.load_lora_for_models`` maps
directly onto the model's weights.
"""
from __future__ import annotations

import torch

from .base import Adapter, LayerSpec
from .lora import LoRAAdapter
from .targets import Target

COMFY_PREFIX = "diffusion_model."
ALGORITHMS = {"lora": LoRAAdapter}


def _split_key(key: str, modules: dict[str, torch.nn.Module]) -> tuple[str | None, str]:
    """('input_blocks.1.1.proj_in', 'lora_up.weight') for a ComfyUI-style key; (None, '') if no layer."""
    if not key.startswith(COMFY_PREFIX):
        return None, ""
    rest = key[len(COMFY_PREFIX):]
    parts = rest.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        layer = ".".join(parts[:cut])
        if layer in modules:
            return layer, ".".join(parts[cut:])
    return None, ""


class AdapterNetwork(torch.nn.Module):
    """Holds the adapters of one model, keyed by layer name, in a stable order."""

    def __init__(self, adapters: dict[str, Adapter]):
        super().__init__()
        self.names = list(adapters)
        self.layers = torch.nn.ModuleList(adapters[n] for n in self.names)

    def items(self):
        return zip(self.names, self.layers)

    def __len__(self):
        return len(self.names)

    @property
    def algorithm(self) -> str:
        return self.layers[0].algorithm if len(self.layers) else ""

    @property
    def rank(self) -> int:
        return self.layers[0].rank if len(self.layers) else 0

    @classmethod
    def create(cls, targets: list[Target], algorithm: str, rank: int, alpha: float, *,
               dtype=torch.float32, device=None, seed: int = 0, **options) -> "AdapterNetwork":
        """Fresh adapters (exact no-ops) for the target layers; init is deterministic in ``seed``."""
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm '{algorithm}' is not available; choose one of {', '.join(ALGORITHMS)}")
        generator = torch.Generator().manual_seed(seed)
        adapter_cls = ALGORITHMS[algorithm]
        adapters = {
            t.name: adapter_cls.create(LayerSpec.of(t.module), rank, alpha, dtype=dtype, device=device,
                                       generator=generator, **options)
            for t in targets
        }
        return cls(adapters)

    @classmethod
    def from_state_dict(cls, modules: dict[str, torch.nn.Module], state: dict[str, torch.Tensor], *,
                        dtype=torch.float32, device=None) -> tuple["AdapterNetwork", list[str]]:
        """Adapters found in a ComfyUI-style state dict; also returns the keys that matched no layer."""
        by_layer: dict[str, dict[str, torch.Tensor]] = {}
        unmatched = []
        for key, tensor in state.items():
            layer, suffix = _split_key(key, modules)
            if layer is None:
                unmatched.append(key)
            else:
                by_layer.setdefault(layer, {})[suffix] = tensor
        adapters: dict[str, Adapter] = {}
        for layer, tensors in by_layer.items():
            spec = LayerSpec.of(modules[layer])
            for adapter_cls in ALGORITHMS.values():
                adapter = adapter_cls.from_state_dict(spec, tensors, dtype=dtype, device=device)
                if adapter is not None:
                    adapters[layer] = adapter
                    break
            else:
                unmatched.extend(f"{COMFY_PREFIX}{layer}.{suffix}" for suffix in tensors)
        return cls(adapters), sorted(unmatched)

    def to_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """ComfyUI-style keys (``diffusion_model.<layer>.lora_up.weight`` ...), detached copies."""
        out: dict[str, torch.Tensor] = {}
        for name, adapter in self.items():
            for key, tensor in adapter.to_state_dict(COMFY_PREFIX + name).items():
                if dtype is not None and tensor.is_floating_point() and tensor.ndim > 0:
                    tensor = tensor.to(dtype)
                out[key] = tensor.cpu()
        return out

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
