"""A set of adapters, one per target layer, with the file layout ComfyUI's LoRA loader reads.

Layer names are module paths inside the diffusion model; in a state dict they appear under
``diffusion_model.<name>`` (ComfyUI key style), which ``comfy.sd.load_lora_for_models`` maps
directly onto the model's weights.
"""
from __future__ import annotations

import torch

from .base import Adapter, LayerSpec
from .keys import COMFY_PREFIX, split_comfy_key
from .offsets import OFFSET_SUFFIXES, OffsetSet
from .targets import Target

from .registry import ALGORITHMS


class AdapterNetwork(torch.nn.Module):
    """Holds the adapters of one model, keyed by layer name, in a stable order."""

    def __init__(self, adapters: dict[str, Adapter], offsets: OffsetSet | None = None):
        super().__init__()
        self.names = list(adapters)
        self.layers = torch.nn.ModuleList(adapters[n] for n in self.names)
        self.offsets = offsets if offsets is not None else OffsetSet({})

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
               dtype=torch.float32, device=None, seed: int = 0, offsets_of: torch.nn.Module | None = None,
               **options) -> "AdapterNetwork":
        """Fresh adapters (exact no-ops) for the target layers; init is deterministic in ``seed``.

        ``offsets_of``: a diffusion model whose norm weights and biases also get trainable offsets.
        ``alpha`` 0 means alpha = rank (no scaling), the rule kohya and LyCORIS follow: taken
        literally it would scale every update, and every gradient, to zero.
        """
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm '{algorithm}' is not available; choose one of {', '.join(ALGORITHMS)}")
        if alpha == 0:
            alpha = float(rank)
        generator = torch.Generator().manual_seed(seed)
        adapter_cls = ALGORITHMS[algorithm]
        adapters = {}
        for t in targets:
            adapter = adapter_cls.create(LayerSpec.of(t.module), rank, alpha, dtype=dtype, device=device,
                                         generator=generator, **options)
            if getattr(adapter, "is_dora", False):
                # DoRA's magnitude starts at the base weight's norms; set it now, not lazily in the first
                # forward, so a checkpointed recompute sees the same tensors as the original forward.
                with torch.no_grad():
                    adapter.init_magnitude(t.module.weight.detach().to(device=device))
            adapters[t.name] = adapter
        offsets = OffsetSet.create(offsets_of, dtype=dtype, device=device) if offsets_of is not None else None
        return cls(adapters, offsets)

    @classmethod
    def from_state_dict(cls, modules: dict[str, torch.nn.Module], state: dict[str, torch.Tensor], *,
                        dtype=torch.float32, device=None) -> tuple["AdapterNetwork", list[str]]:
        """Adapters found in a ComfyUI-style state dict; also returns the keys that matched no layer."""
        by_layer: dict[str, dict[str, torch.Tensor]] = {}
        offset_tensors: dict[tuple[str, str], torch.Tensor] = {}
        unmatched = []
        for key, tensor in state.items():
            layer, suffix = split_comfy_key(key, modules)
            if layer is None:
                unmatched.append(key)
            elif suffix in OFFSET_SUFFIXES:
                offset_tensors[(layer, suffix)] = tensor
            else:
                by_layer.setdefault(layer, {})[suffix] = tensor
        offsets, rejected = OffsetSet.from_tensors(modules, offset_tensors, dtype=dtype, device=device)
        unmatched.extend(f"{COMFY_PREFIX}{layer}.{suffix}" for layer, suffix in rejected)
        adapters: dict[str, Adapter] = {}
        order = {name: i for i, name in enumerate(modules)}  # creation order, not the file's sorted order
        for layer, tensors in sorted(by_layer.items(), key=lambda item: order[item[0]]):
            try:
                spec = LayerSpec.of(modules[layer])
            except TypeError:  # e.g. adapter keys on a norm layer
                unmatched.extend(f"{COMFY_PREFIX}{layer}.{suffix}" for suffix in tensors)
                continue
            for adapter_cls in ALGORITHMS.values():
                adapter = adapter_cls.from_state_dict(spec, tensors, dtype=dtype, device=device)
                if adapter is not None:
                    _check_all_read(f"{COMFY_PREFIX}{layer}", tensors, adapter)
                    adapters[layer] = adapter
                    break
            else:
                unmatched.extend(f"{COMFY_PREFIX}{layer}.{suffix}" for suffix in tensors)
        return cls(adapters, offsets), sorted(unmatched)

    def to_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """ComfyUI-style keys (``diffusion_model.<layer>.lora_up.weight`` ...), detached copies."""
        out: dict[str, torch.Tensor] = {}
        for name, adapter in self.items():
            for key, tensor in adapter.to_state_dict(COMFY_PREFIX + name).items():
                if dtype is not None and tensor.is_floating_point() and tensor.ndim > 0:
                    tensor = tensor.to(dtype)
                out[key] = tensor.cpu()
        out.update(self.offsets.to_state_dict(COMFY_PREFIX))
        return out

    def named_trainables(self):
        """(stable name, parameter) pairs: ``<layer>:<param>``, independent of creation order."""
        for name, adapter in self.items():
            for pname, param in adapter.named_parameters():
                yield f"{name}:{pname}", param
        for (layer, suffix), value in self.offsets.items():
            yield f"{layer}:{suffix}", value

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def _check_all_read(layer_key: str, tensors: dict[str, torch.Tensor], adapter: Adapter) -> None:
    """Raises ValueError when a layer's file tensors hold more than its adapter reads back (a LoHa
    or LoKr with a DoRA magnitude, say): continuing would silently drop that part."""
    read = {key.split(".", 1)[1] for key in adapter.to_state_dict("x")}
    extra = sorted(set(tensors) - read)
    if extra:
        raise ValueError(f"{layer_key} holds {', '.join(extra)} besides its {adapter.algorithm} weights; LoRA Lab "
                         "cannot train that part, so continuing would drop it")
